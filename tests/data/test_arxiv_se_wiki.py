from __future__ import annotations

import bz2
import io
import tarfile

import pytest

from llamaworks.data.arxiv import ArxivCleaner, ArxivReader, expand, macros
from llamaworks.data.document import Document, read_jsonl
from llamaworks.data.stackexchange import SiteFilter, StackExchangeReader, html_to_text

PAPER = r"""\documentclass{article}
\newcommand{\R}{\mathbb{R}}
\newcommand\eg{e.g.\ }
\def\foo{bar}
\newcommand{\sq}[1]{#1^2}
\newcommand{\nest}{\foo{} and {braces}}
\begin{document}
\title{T}
\maketitle
\section{Intro}
We work in \R and \foo, \eg here. 50\% done % a comment
% full comment line
\sq{x} and \foobar stays; \nest.
\section{References}
[1] A. Author.
\end{document}
"""


def test_arxiv_cleaner():
    text, removed = ArxivCleaner().clean(Document("p", PAPER, "arxiv"))
    assert text == ("\\section{Intro}\nWe work in \\mathbb{R} and bar, e.g.\\  here. 50\\% done \n"
                    "\\sq{x} and \\foobar stays; bar{} and {braces}.\n")
    assert removed["comment"] == ["% full comment line"]
    assert removed["bibliography and after"][0] == "\\section{References}"


def test_arxiv_adversarial():
    c = ArxivCleaner()
    assert c.clean(Document("a", "no sections at all", "x"))[0] is None
    # unbalanced definition: left alone, no crash, no hang
    text, _ = c.clean(Document("b", "\\newcommand{\\x}{never closed\n\\section{A}\nbody " + "{" * 10000, "x"))
    assert text.startswith("\\section{A}")
    # a self-referencing \def stops after a bounded number of rounds
    defs, _ = macros(r"\def\loop{\loop x}")
    assert expand(r"\loop", defs).count("x") == 5
    assert c.clean(Document("c", "\\section{A}\n% only\n\\begin{thebibliography}{9}\n", "x"))[0] == "\\section{A}\n"


def test_arxiv_reader_tar_and_folder(tmp_path):
    buf = tmp_path / "2301.00001.tar.gz"
    with tarfile.open(buf, "w:gz") as tar:
        for name, text in [("sec.tex", "\\section{Two}\nmore"), ("main.tex", PAPER)]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (doc,) = ArxivReader().read(buf)
    assert doc.id == "2301.00001" and doc.metadata["files"] == ["main.tex", "sec.tex"]
    (tmp_path / "bad.tar").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.tar"):
        list(ArxivReader().read(tmp_path / "bad.tar"))


POSTS = """<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" Score="5" Title="How to add?" Body="&lt;p&gt;What is 1+1?&lt;/p&gt;" />
  <row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;Low answer&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="1" Score="10" Body="&lt;p&gt;It is &lt;b&gt;2&lt;/b&gt;.&lt;/p&gt;" />
  <row Id="4" PostTypeId="1" Score="0" Title="Unanswered" Body="&lt;p&gt;Anyone?&lt;/p&gt;" />
  <row Id="5" PostTypeId="5" Body="tag wiki" />
</posts>
"""


def test_stackexchange_reader_sorts_answers(tmp_path):
    site = tmp_path / "math.stackexchange.com"
    site.mkdir()
    (site / "Posts.xml").write_text(POSTS)
    docs = list(StackExchangeReader().read(site / "Posts.xml"))
    assert docs[0].text == "Q: How to add?\n\nWhat is 1+1?\n\nA: It is 2.\n\nA: Low answer\n"
    assert docs[1].text == "Q: Unanswered\n\nAnyone?\n"
    assert SiteFilter().reason(docs[0]) is None
    assert SiteFilter(["cooking.stackexchange.com"]).reason(docs[0]).startswith("site math")
    (site / "Posts.xml").write_text("<posts><row Id='1' PostTypeId='1'")
    with pytest.raises(ValueError, match="Posts.xml"):
        list(StackExchangeReader().read(site / "Posts.xml"))


@pytest.mark.parametrize("html,text", [
    ("<p>a &lt; b &amp;&amp; c > d</p>", "a < b && c > d"),
    ("<p>x<script>if (a<b) alert('<p>')</script>y</p>", "xy"),
    ("<pre><code>if (a&lt;b &amp;&amp; c&gt;d) {}</code></pre>", "if (a<b && c>d) {}"),
    ("<p>a<b && c>d</p>", "ad"),  # unescaped "<b ...>" is a tag, as a browser reads it (dumps escape code)
    ("unclosed <b>bold <i>both", "unclosed bold both"),
    ("", ""),
])
def test_html_to_text(html, text):
    assert html_to_text(html) == text


WIKI = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <siteinfo><dbname>enwiki</dbname></siteinfo>
  <page><title>Ada</title><ns>0</ns><id>7</id><revision><text>{{Infobox person|name=X|birth={{date|1900}}}}
'''Ada''' was a [[mathematician|math person]] from [[London]].&lt;ref&gt;{{cite web|url=x}}&lt;/ref&gt;
&lt;!-- hidden --&gt;
== Life ==
She wrote [[File:Ada.jpg|thumb|a [[caption]]]] notes.&lt;ref name=a/&gt;
{| class=wikitable
|-
| cell || cell2
|}
[[Category:People]]</text></revision></page>
  <page><title>AdaL</title><ns>0</ns><id>8</id><redirect title="Ada"/>
    <revision><text>#REDIRECT [[Ada]]</text></revision></page>
  <page><title>Talk:Ada</title><ns>1</ns><id>9</id><revision><text>talk</text></revision></page>
  <page><title>Empty</title><ns>0</ns><id>10</id><revision><text>{{stub}}</text></revision></page>
</mediawiki>
"""


def test_wikipedia_pipeline(tmp_path):
    pytest.importorskip("mwparserfromhell")
    from llamaworks.data.executor import LocalExecutor
    from llamaworks.data.sources import pipeline

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "enwiki-20220701-pages-articles.xml.bz2").write_bytes(bz2.compress(WIKI.encode()))
    (tmp_path / "in" / "frwiki-20220701-pages-articles.xml").write_text(WIKI.replace("enwiki", "xxwiki"))
    reader, steps = pipeline("wikipedia")
    stats = LocalExecutor(tmp_path / "out", workers=1, progress=False).run("wikipedia", reader, steps,
                                                                          [tmp_path / "in"])
    docs = [d for p in sorted((tmp_path / "out" / "documents").glob("*.gz")) for d in read_jsonl(p)]
    assert [d.text for d in docs] == ["Ada was a math person from London.\nLife\nShe wrote  notes.\n"]
    assert stats["steps"][0]["dropped"]["language xx not in the list"]["documents"] == 2  # Ada and Empty
    assert "no text left after removing markup" in stats["steps"][1]["dropped"]


def test_cli_books_end_to_end(tmp_path):
    from llamaworks.cli import main

    (tmp_path / "in").mkdir()
    body = "\n".join(f"Line {i} of a long book about the sea and ships." for i in range(300))
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.txt").write_text(
            f"Header {name}\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n{body}\n*** END OF THE PROJECT "
            "GUTENBERG EBOOK X ***\nlicence\n")
    assert main(["data", "run", "books", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--workers", "2", "--keep-excluded"]) == 0
    card = (tmp_path / "out" / "DATACARD.md").read_text()
    assert "near-duplicate" in card and "Project Gutenberg header" in card
    assert [d.id for d in read_jsonl(next((tmp_path / "out" / "excluded").glob("*.gz")))] == ["b"]
