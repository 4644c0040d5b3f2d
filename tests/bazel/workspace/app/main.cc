#include <iostream>
#include "lib/greet.h"
int main() { std::cout << greet("bazel") << std::endl; return 0; }
