"""StackExchange (section 2.1): the public dump's Posts.xml, one document per question with
its answers sorted by score (highest first), HTML removed with a real parser.

The dump is one folder (or .7z, unpacked by the user) per site, e.g.
`math.stackexchange.com/Posts.xml`; the site is the folder name.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from html.parser import HTMLParser

from llamaworks.data.document import Document, MalformedInput
from llamaworks.data.executor import Reader
from llamaworks.data.step import Filter

# "the 28 largest websites" (section 2.1): the largest sites of the 2023 dump by Posts.xml size,
# as RedPajama-Data v1 took them; pass --sites to use another list.
LARGEST_SITES = (
    "stackoverflow.com", "math.stackexchange.com", "superuser.com", "askubuntu.com", "serverfault.com",
    "tex.stackexchange.com", "unix.stackexchange.com", "physics.stackexchange.com", "electronics.stackexchange.com",
    "stats.stackexchange.com", "mathoverflow.net", "gis.stackexchange.com", "english.stackexchange.com",
    "apple.stackexchange.com", "salesforce.stackexchange.com", "wordpress.stackexchange.com",
    "magento.stackexchange.com", "sharepoint.stackexchange.com", "gaming.stackexchange.com",
    "dba.stackexchange.com", "codereview.stackexchange.com", "ell.stackexchange.com",
    "softwareengineering.stackexchange.com", "scifi.stackexchange.com", "mathematica.stackexchange.com",
    "drupal.stackexchange.com", "security.stackexchange.com", "blender.stackexchange.com")
assert len(LARGEST_SITES) == 28


class _Text(HTMLParser):
    # Block elements become line breaks so paragraphs and code lines stay apart.
    _BLOCK = {"p", "br", "div", "pre", "li", "ul", "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
              "hr", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.hidden = 0  # inside <script>/<style>: not text

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.hidden += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.hidden = max(0, self.hidden - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.out.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    p.feed(html)
    p.close()
    lines = [x.rstrip() for x in "".join(p.out).split("\n")]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


class StackExchangeReader(Reader):
    name = "stackexchange"
    patterns = ("Posts.xml",)

    def read(self, path):
        site = path.parent.name
        questions: dict[str, dict] = {}
        answers: dict[str, list[tuple[int, str]]] = {}
        try:
            # iterparse + clear: rows stream; only the kept text of questions/answers stays in memory
            for _, el in ET.iterparse(path, events=("end",)):
                if el.tag != "row":
                    continue
                a = el.attrib
                kind = a.get("PostTypeId")
                if kind == "1":
                    questions[a["Id"]] = {"title": a.get("Title", ""), "body": a.get("Body", ""),
                                          "score": int(a.get("Score", 0))}
                elif kind == "2" and a.get("ParentId"):
                    answers.setdefault(a["ParentId"], []).append((int(a.get("Score", 0)), a.get("Body", "")))
                el.clear()
        except (ET.ParseError, KeyError, ValueError) as e:
            raise MalformedInput(f"{path}: not a StackExchange Posts.xml ({e})") from None
        for qid, q in questions.items():
            parts = [f"Q: {q['title']}\n\n{html_to_text(q['body'])}"]
            # Section 2.1: answers sorted by score, highest first (stable: ties keep dump order).
            for _, body in sorted(answers.get(qid, []), key=lambda sa: -sa[0]):
                parts.append(f"A: {html_to_text(body)}")
            yield Document(id=f"{site}/{qid}", text="\n\n".join(parts) + "\n", source="stackexchange",
                           metadata={"site": site, "question_id": qid, "answers": len(answers.get(qid, []))})


class SiteFilter(Filter):
    name = "sites"

    def __init__(self, sites=None):
        self.sites = tuple(sites) if sites else LARGEST_SITES

    def reason(self, doc):
        site = doc.metadata.get("site", "")
        return None if site in self.sites else f"site {site} not in the site list"

    def describe(self):
        largest = " (the 28 largest)" if self.sites == LARGEST_SITES else ""
        return f"keep questions of {len(self.sites)} sites{largest}"
