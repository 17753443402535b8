"""Write book/interview.md: every chapter's interview questions in one bank, with links to the
sections that prove each answer.

Usage: python scripts/interview_bank.py [--check]    (`make sync` runs it)

The questions live in the chapters, next to the cells that compute their numbers (each chapter's
"## Interview questions" list: `N. *Question?* Answer ... (section K)`). This script copies them in
book order, grouped by chapter (one topic each), marks each with a level, and turns every
"section K" an answer cites into a link to that chapter's "## K. ..." heading. The links are MyST
heading anchors: a renamed or renumbered section breaks `make book` (warnings are errors), and
`tests/test_book_tools.py` fails when this page is out of date with the chapters.

Levels: "ML engineer" (what a practitioner must explain: shapes, costs, defaults, failure modes)
or "research engineer" (a derivation, an objective, or a paper's argument); RESEARCH lists the
latter by the start of their question, and a test fails if an entry no longer matches a question.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_book import toc_pages  # noqa: E402  (the table of contents, read one way for both scripts)
PAGE = ROOT / "book" / "interview.md"

# (chapter folder, start of the question) for the research-engineer questions.
RESEARCH = {
    ("00_pipeline", "What does one DDIM step compute?"),
    ("00_pipeline", "What is the training loss?"),
    ("01_vae_losses", "Why does an autoencoder trained with MSE"),
    ("01_vae_losses", "What is the adaptive weight"),
    ("01_vae_losses", "What does SD's KL weight"),
    ("01_vae_losses", "How do you detect codebook collapse"),
    ("02_scaling_factor", "Why scale latents at all?"),
    ("02_scaling_factor", "Why do SD3 and FLUX have a shift factor?"),
    ("02_scaling_factor", "Can you compare the training losses"),
    ("03_cross_attention", "How does DAAM build"),
    ("03_cross_attention", "Why not condition the U-Net on CLIP's pooled vector?"),
    ("04_guidance", "Write classifier-free guidance."),
    ("04_guidance", "What is a guidance interval?"),
    ("05_sd_versions", "What is v-prediction?"),
    ("05_sd_versions", "Rectified flow vs DDPM?"),
    ("05_sd_versions", "Does rectified flow let you sample"),
    ("05_sd_versions", "Why did diffusion transformers replace U-Nets?"),
    ("07_latent_space", "What is DDIM inversion?"),
    ("07_latent_space", "Why does guidance break inversion?"),
    ("07_latent_space", "How does negative-prompt inversion work?"),
}
LEVELS = {"MLE": "ML engineer", "RE": "research engineer"}

QUESTION = re.compile(r"^(\d+)\.\s+\*(.+?)\*\s*(.*)$")
SECTION_REF = re.compile(r"[Ss]ections?\s+((?:\d+(?:\s*(?:-|–|,|and|or)\s*)?)+)")


@dataclass
class Question:
    chapter: str          # folder name, e.g. "00_pipeline"
    number: int
    question: str
    answer: str
    sections: list[int]

    @property
    def level(self) -> str:
        return "RE" if any(c == self.chapter and self.question.startswith(s) for c, s in RESEARCH) else "MLE"


def slugify(title: str) -> str:
    """MyST's heading anchor for a title (myst_parser's default_slugify, GitHub's rule)."""
    from myst_parser.mdit_to_docutils.base import default_slugify

    return default_slugify(title)


def toc_chapters(toc: Path = ROOT / "_toc.yml") -> list[Path]:
    """The chapters (book/NN_x/x) of the table of contents, in book order."""
    return [ROOT / f"{page}.md" for page in toc_pages(toc) if page.count("/") == 2]


def section_numbers(text: str) -> list[int]:
    found: list[int] = []
    for m in SECTION_REF.finditer(text):
        for a, b in re.findall(r"(\d+)\s*(?:[-–]\s*(\d+))?", m.group(1)):
            lo, hi = int(a), int(b or a)
            found.extend(n for n in range(lo, hi + 1) if n not in found)
    return found


def parse(md: Path) -> tuple[str, dict[int, str], list[Question]]:
    """A chapter's title, its numbered sections (number -> heading) and its interview questions."""
    lines = md.read_text().splitlines()
    title = next(line[2:].strip() for line in lines if line.startswith("# "))
    sections = {}
    for line in lines:
        m = re.match(r"^## (\d+)\. (.+)$", line)
        if m:
            sections[int(m.group(1))] = f"{m.group(1)}. {m.group(2).strip()}"
    try:
        start = lines.index("## Interview questions")
    except ValueError:
        return title, sections, []
    items: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("## ") or line.startswith("```"):
            break
        if QUESTION.match(line):
            items.append([line])
        elif items and line.startswith("   ") and line.strip():
            items[-1].append(line.strip())
        elif items and not line.strip():
            items.append([])                        # a blank line ends the current item
    questions = []
    for item in (i for i in items if i):
        m = QUESTION.match(item[0])
        answer = " ".join([m.group(3), *item[1:]]).strip()
        questions.append(Question(md.parent.name, int(m.group(1)), m.group(2).strip(), answer,
                                  section_numbers(answer)))
    return title, sections, questions


def render(chapters: list[Path] | None = None) -> str:
    chapters = toc_chapters() if chapters is None else chapters
    parsed = [(md, *parse(md)) for md in chapters]
    total = sum(len(q) for *_, q in parsed)
    n_re = sum(q.level == "RE" for *_, qs in parsed for q in qs)
    out = [
        "# Interview questions: the bank",
        "",
        f"{total} questions from the chapters, in book order, one topic per chapter. Each answer",
        "starts with the number a candidate can say, and links to the section whose cells compute it.",
        f"Levels: **ML engineer** ({total - n_re}) for what a practitioner must explain (shapes, costs,",
        f"defaults, failure modes); **research engineer** ({n_re}) for a derivation, an objective or a",
        "paper's argument. Drill them by covering the answer; check yourself against the linked cells.",
        "",
        "This page is written by `scripts/interview_bank.py` from the chapters (`make sync`).",
        "",
    ]
    for md, title, sections, questions in parsed:
        if not questions:
            continue
        rel = md.relative_to(ROOT / "book").as_posix()
        out += [f"## {title}", "", f"From [the chapter]({rel}).", ""]
        for q in questions:
            links = [f"[{sections[n]}]({rel}#{slugify(sections[n])})" for n in q.sections if n in sections]
            where = ("Proved in " + ", ".join(links) + ".") if links else f"See [the chapter]({rel})."
            out += [f"**{q.question}** *({LEVELS[q.level]})*", "", f"{q.answer}", "", f"{where}", ""]
    return "\n".join(out).rstrip() + "\n"


def stale_research_keys(chapters: list[Path] | None = None) -> list[tuple[str, str]]:
    chapters = toc_chapters() if chapters is None else chapters
    questions = [q for md in chapters for q in parse(md)[2]]
    return sorted(k for k in RESEARCH if not any(q.chapter == k[0] and q.question.startswith(k[1])
                                                   for q in questions))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if book/interview.md is out of date")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run `make sync`")
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
