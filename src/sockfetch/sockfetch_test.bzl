"""The rule for sockfetch's test suites."""

load("@rules_cc//cc:defs.bzl", "cc_test")

def sockfetch_test(name, deps = []):
    """A suite of KJ_TEST cases: `name`.c++ beside this rule, run by kj-test's main.

    Args:
      name: the suite's name, which is also its source file's without `.c++`.
      deps: what the suite uses besides kj-test.
    """
    cc_test(
        name = name,
        size = "small",
        srcs = [name + ".c++"],
        deps = deps + ["@system_libs//:kj-test"],
    )
