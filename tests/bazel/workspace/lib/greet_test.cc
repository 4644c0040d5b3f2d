#include "lib/greet.h"
int main() { return greet("kiln") == "hello, kiln" ? 0 : 1; }
