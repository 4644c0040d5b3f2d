#!/bin/sh
[ "$(app/app)" = "hello, bazel" ]
