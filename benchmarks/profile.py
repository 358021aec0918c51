"""Where one training epoch's time goes, part by part: `python benchmarks/profile.py RECIPE [--epochs 3]`.

RECIPE: basenet | bnpre | resnet50. The code is in epoch_profile.py (its docstring says what is timed
and how). This file only starts it: its name is also the standard library's `profile`, which cProfile
imports (torch._dynamo imports cProfile), so when a script of this folder imports `profile`, this file
turns itself into the standard library's module instead.
"""
import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here] + [here]
    from epoch_profile import main
    main()
else:
    import sysconfig
    __file__ = os.path.join(sysconfig.get_paths()["stdlib"], "profile.py")
    with open(__file__) as f:
        exec(compile(f.read(), __file__, "exec"))
