"""The tools behind the rendered book: the Sphinx fix, the execution-cache seeding, the setup cell."""
import importlib.util
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


book_fixes = _load("book_fixes", ROOT / "_ext" / "book_fixes.py")
seed = _load("seed_book_cache", ROOT / "scripts" / "seed_book_cache.py")
setup_cell = _load("setup_cell", ROOT / "scripts" / "setup_cell.py")


def test_dedupe_drops_the_second_copy_of_an_inline_script_only():
    from sphinx.builders.html._assets import _JavaScript

    body = 'const THEBE_JS_URL = "x"'
    scripts = [_JavaScript("_static/a.js", priority=500), _JavaScript(None, body=body),
               _JavaScript("", body=body), _JavaScript("", body="const other = 1"),
               _JavaScript("_static/a.js", priority=800)]
    assert scripts[1] != scripts[2]                       # what Sphinx 7.4 writes twice
    context = {"script_files": list(scripts)}
    book_fixes.dedupe_scripts(None, "page", "page.html", context, None)
    kept = context["script_files"]
    assert [js.attributes.get("body") for js in kept].count(body) == 1
    assert len(kept) == 4 and kept[0] is scripts[0] and kept[-1] is scripts[-1]


MD = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
# A page

```{code-cell} ipython3
print(6 * 7)
```
"""


def _executed(md_path: Path, out: Path, error: bool = False) -> Path:
    nb = jupytext.read(md_path)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    if error:
        cell.outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[]))
    cell.metadata["execution"] = {"iopub.status.busy": "2026-12-02T01:00:00Z"}   # nbclient's timings
    nbformat.write(nb, out)
    return out


def test_seeded_notebook_is_a_cache_hit_for_its_markdown_source(tmp_path):
    from jupyter_cache import get_cache

    md = tmp_path / "page.md"
    md.write_text(MD)
    executed = tmp_path / "run"
    executed.mkdir()
    _executed(md, executed / "page.ipynb")
    assert seed.main(str(executed), str(tmp_path / "cache")) == 0
    cache = get_cache(str(tmp_path / "cache"))
    record = cache.match_cache_notebook(jupytext.read(md))
    bundle = cache.get_cache_bundle(record.pk)
    code = [c for c in bundle.nb.cells if c.cell_type == "code"]
    assert code[0].outputs[0]["text"] == "42\n"
    md.write_text(MD.replace("6 * 7", "6 * 8"))           # an edited chapter misses and runs again
    with pytest.raises(KeyError):
        cache.match_cache_notebook(jupytext.read(md))


def test_a_notebook_with_an_error_is_not_cached(tmp_path):
    from jupyter_cache import get_cache

    md = tmp_path / "page.md"
    md.write_text(MD)
    executed = tmp_path / "run"
    executed.mkdir()
    _executed(md, executed / "page.ipynb", error=True)
    seed.main(str(executed), str(tmp_path / "cache"))
    assert get_cache(str(tmp_path / "cache")).list_cache_records() == []


def test_setup_cell_is_rewritten_from_the_repository_url(tmp_path):
    md = tmp_path / "chapter.md"
    md.write_text("# C\n\n```{code-cell} ipython3\n" + setup_cell.MARKER +
                  "\nimport sys\nOLD = 1\n```\n\n```{code-cell} ipython3\nx = 1\n```\n")
    assert setup_cell.main(["--check", str(md)]) == 1
    assert setup_cell.main([str(md)]) == 0
    text = md.read_text()
    assert "OLD = 1" not in text and "x = 1" in text
    assert f'"git+{setup_cell.repository_url()}"' in text
    assert setup_cell.main(["--check", str(md)]) == 0
    exec(compile(setup_cell.cell_source("https://example.org/fork"), "cell", "exec"), {})  # valid Python


def test_setup_cell_refuses_a_chapter_without_one(tmp_path):
    md = tmp_path / "chapter.md"
    md.write_text("# C\n\n```{code-cell} ipython3\nx = 1\n```\n")
    with pytest.raises(SystemExit, match="no setup cell"):
        setup_cell.rewrite(md, setup_cell.cell_source())


bank = _load("interview_bank", ROOT / "scripts" / "interview_bank.py")

CHAPTER = """# A chapter

## 1. First idea

## 2. Second idea, written out

## Interview questions

1. *What is the first idea?* 42, from sections 1-2.
   It continues on a second line.
2. *And the second?* 7 (section 2), not 3.

## Common mistakes
"""


def test_bank_links_each_cited_section_and_keeps_the_whole_answer(tmp_path):
    md = tmp_path / "book" / "09_x" / "x.md"
    md.parent.mkdir(parents=True)
    md.write_text(CHAPTER)
    title, sections, questions = bank.parse(md)
    assert title == "A chapter" and sections == {1: "1. First idea", 2: "2. Second idea, written out"}
    assert [q.question for q in questions] == ["What is the first idea?", "And the second?"]
    assert questions[0].answer == "42, from sections 1-2. It continues on a second line."
    assert [q.sections for q in questions] == [[1, 2], [2]]
    old_root = bank.ROOT
    bank.ROOT = tmp_path
    try:
        page = bank.render([md])
    finally:
        bank.ROOT = old_root
    assert "[2. Second idea, written out](09_x/x.md#2-second-idea-written-out)" in page
    assert page.count("**What is the first idea?** *(ML engineer)*") == 1
    assert "2 questions" in page


def test_section_numbers_read_ranges_lists_and_single_sections():
    assert bank.section_numbers("(sections 1 and 3)") == [1, 3]
    assert bank.section_numbers("Section 9 prints it; sections 1-3 run it") == [9, 1, 2, 3]
    assert bank.section_numbers("no reference here, 5 of them") == []


def test_every_research_level_entry_still_names_a_question():
    assert bank.stale_research_keys() == []


def test_every_chapter_setup_cell_comes_from_the_template():
    stale = [md.relative_to(ROOT) for md in setup_cell.chapters()
             if setup_cell.main(["--check", str(md)]) != 0]
    assert not stale, f"run `make sync`: these chapters' setup cells differ from scripts/setup_cell.py: {stale}"


def test_interview_bank_is_up_to_date_with_the_chapters():
    assert bank.main(["--check"]) == 0, "run `make sync` (scripts/interview_bank.py)"


def test_the_notebook_benchmark_refuses_a_bad_path_before_it_writes_the_table(capsys):
    bench = _load("bench_notebooks", ROOT / "scripts" / "bench_notebooks.py")
    table = ROOT / "benchmarks" / "notebooks.md"
    before = table.read_text()
    assert bench.main(["--help"]) == 0 and "make bench" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="existing .ipynb files, got \\['nope.ipynb'\\]"):
        bench.main(["nope.ipynb"])
    assert table.read_text() == before


variants = _load("guidance_variants", ROOT / "scripts" / "guidance_variants.py")


def test_guidance_variants_rules_agree_with_cfg_where_they_should():
    import torch
    g = torch.Generator().manual_seed(0)
    eu, ec, x = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ac = torch.linspace(0.999, 0.01, 1000)
    cfg = variants.rule({"mode": "cfg"}, ac)(eu, ec, 500, x, True)
    assert torch.allclose(cfg, eu + 5.0 * (ec - eu))
    # APG with eta 1 and no momentum is CFG again (diffusers' normalized_guidance, in x0 space)
    apg1 = variants.rule({"mode": "apg", "eta": 1.0}, ac)(eu, ec, 500, x, True)
    assert torch.allclose(apg1, cfg, atol=1e-4)
    apg0 = variants.rule({"mode": "apg", "eta": 0.0}, ac)(eu, ec, 500, x, True)
    assert (apg0 - cfg).abs().max() > 1e-2
    # equal scales in both bands are CFG
    both = variants.rule({"mode": "freq", "w_lo": 5.0, "w_hi": 5.0}, ac)(eu, ec, 500, x, True)
    assert torch.allclose(both, cfg, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        variants.rule({"mode": "nope"}, ac)(eu, ec, 500, x, True)


def test_guidance_variants_refuses_unknown_rows(capsys):
    with pytest.raises(SystemExit) as e:
        variants.main(["--rows", "no such row"])
    assert e.value.code == 2 and "--rows must be among" in capsys.readouterr().err


fnt = _load("fixed_norm_tail", ROOT / "scripts" / "fixed_norm_tail.py")


def test_fixed_norm_tail_freezes_groupnorm_exactly_at_one_images_statistics():
    import torch
    from ldm_tutorial.arch import decoder_features, decoder_rest
    from ldm_tutorial.tinysd import load_vae, shapes
    vae = load_vae(groupnorm=True)
    x = shapes.render(shapes.sample_scenes(2, seed=5))
    with torch.no_grad():
        h = decoder_features(vae, vae.encode(x).latent_dist.mean, fnt.STAGE)
        tail = fnt.Tail(vae)
        assert torch.allclose(tail(h), decoder_rest(vae, h, fnt.STAGE), atol=1e-5)
        # with the statistics of image 0 alone, the frozen tail is the GroupNorm tail on image 0
        assert fnt.freeze_norms(tail, h[:1]) == 9
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in tail.modules())
        ref = decoder_rest(vae, h, fnt.STAGE)
        out = tail(h)
    assert torch.allclose(out[:1], ref[:1], atol=1e-3)
    assert (out[1:] - ref[1:]).abs().max() > 1e-2    # image 1's own statistics differ
    with pytest.raises(ValueError, match="mean and std must have shape"):
        fnt.FixedNorm.from_group_norm(torch.nn.GroupNorm(4, 8), torch.zeros(4), torch.ones(8))


def test_fixed_norm_tail_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        fnt.main(["--steps", "-1", "--out", "/tmp/never"])
    assert e.value.code == 2 and "--steps must be >= 0" in capsys.readouterr().err


def test_fixed_norm_tail_exports_a_folder_that_decodes_as_the_tail(tmp_path):
    import json
    import torch
    from ldm_tutorial.arch import decoder_features
    from ldm_tutorial.tinysd import load_vae, shapes
    from ldm_tutorial.tinysd.fixed_norm import FixedNormAutoencoderKL
    vae = load_vae(groupnorm=True)
    x = shapes.render(shapes.sample_scenes(3, seed=6))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        h = decoder_features(vae, z, fnt.STAGE)
        tail = fnt.Tail(vae)
        fnt.freeze_norms(tail, h)
        tail.conv_out.weight.mul_(1.5)             # a tail that differs from the shipped one
        fnt.export(vae, tail, tmp_path)
        again = FixedNormAutoencoderKL.from_pretrained(tmp_path / "tinysd" / "vae").float().eval()
        want = tail(h)
        got = again.decode(z).sample
        back = load_vae(weights_dir=tmp_path, groupnorm=True)    # the GroupNorm tail, written beside
        gn_err = (back.decode(z).sample - vae.decode(z).sample).abs().max()
    assert len(again.fixed_norm_names()) == 9
    assert (got - want).abs().max() < 0.02              # float16 weights
    assert (got - vae.decode(z).sample).abs().max() > 0.1
    assert torch.equal(again.encoder.conv_in.weight, vae.encoder.conv_in.weight)  # latents unchanged
    assert type(back).__name__ == "AutoencoderKL" and gn_err < 1e-5   # the input ships in float16
    index = json.loads((tmp_path / "tinysd" / "model_index.json").read_text())
    assert index["vae"] == ["ldm_tutorial.tinysd.fixed_norm", "FixedNormAutoencoderKL"]
    with pytest.raises(TypeError, match="GroupNorm AutoencoderKL"):
        fnt.export(again, tail, tmp_path / "again")


def test_fixed_norm_tail_export_needs_the_fixed_norms(capsys):
    with pytest.raises(SystemExit) as e:
        fnt.main(["--eval-only", "--norm", "group", "--export", "/tmp/never", "--out", "/tmp/never"])
    assert e.value.code == 2 and "--export needs --eval-only --norm fixed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        fnt.main(["--eval-only", "--tail", "/tmp/no such file", "--out", "/tmp/never"])
    assert e.value.code == 2 and "is not a file" in capsys.readouterr().err
