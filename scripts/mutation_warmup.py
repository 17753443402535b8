# Appended to tests/conftest.py in `make mutation`'s throwaway copy only (never in the repository).
# mutmut's fork server imports conftest.py once before forking a process per mutant: loading TinySD
# there means each mutant's process finds diffusers imported and the pipelines loaded (0.1 s a
# load_pipeline call instead of about 7 s). Each test's fixture still calls load_pipeline itself.
import os as _os


def _warm_tinysd():
    import ldm_tutorial as ldm

    for task in ("text2img", "img2img", "inpaint"):
        ldm.load_pipeline("tiny", task=task, verbose=False)


# pytest imports conftest.py again inside each mutant's process: warm only where no mutant is
# active (mutmut's clean run, stats and test listing), so a mutant of load_pipeline fails the tests
# that call it, not this file.
if _os.environ.get("MUTANT_UNDER_TEST") in ("", "stats", "list_all_tests"):
    _warm_tinysd()
