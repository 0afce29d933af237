# A package, so that pytest run from the repository root puts
# guest-sdk/python on sys.path (and `import berth` finds the SDK), and
# `python -m unittest discover -s guest-sdk/python/tests -t guest-sdk/python`
# works from there too.
