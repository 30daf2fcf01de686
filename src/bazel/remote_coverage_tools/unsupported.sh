#!/bin/sh
echo "bazel coverage is not supported in this offline build; use bazel test instead." >&2
exit 1
