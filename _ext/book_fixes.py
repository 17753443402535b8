"""Local Sphinx fixes for the rendered book (loaded through `sphinx: local_extensions` in _config.yml).

One script per page: sphinx-thebe adds its configuration as an inline script (`const THEBE_JS_URL =
...`) after the HTML builder is initialised. Sphinx 7.4 then holds two copies of it: the builder's
own, whose filename is None, and the registry's, re-added with the filename ''. They compare unequal,
both are written into every page, and the second `const` declaration is a SyntaxError in the
browser console. This extension removes such duplicates before each page is written.

MathJax offline: the theme loads MathJax from a CDN, which an offline reader (and the browser test)
cannot reach. When `make book` has unpacked MathJax into _build/vendor/mathjax (from the npm
registry), the pages load that copy from _static instead; without it they keep the CDN.
"""
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "_build" / "vendor"


def _key(js):
    return (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree):
    files = context.get("script_files")
    if not isinstance(files, list):
        return
    seen, unique = set(), []
    for js in files:
        key = _key(js)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    files[:] = unique            # the builder restores its own list after each page


def local_mathjax(app, config):
    if (VENDOR / "mathjax" / "tex-mml-chtml.js").exists():
        config.mathjax_path = "mathjax/tex-mml-chtml.js"
        config.html_static_path = [*config.html_static_path, str(VENDOR)]


def setup(app):
    app.connect("config-inited", local_mathjax)
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
