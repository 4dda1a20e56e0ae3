"""Wikipedia (section 2.1): MediaWiki XML dumps of 20 languages, markup removed.

Templates, references, tables, comments and files go; links keep their text (the
mwparserfromhell parser, as RedPajama-Data v1 does via wikiextractor-like cleaning).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from llamaworks.data.document import Document, MalformedInput, open_read
from llamaworks.data.executor import Reader
from llamaworks.data.step import Filter, LineCleaner

# Section 2.1: "20 languages, which use either the Latin or Cyrillic scripts".
LANGUAGES = ("bg", "ca", "cs", "da", "de", "en", "es", "fr", "hr", "hu", "it", "nl", "pl", "pt", "ro", "ru", "sl",
             "sr", "sv", "uk")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class WikipediaReader(Reader):
    """pages-articles dumps (.xml or .xml.bz2): articles (namespace 0), redirects skipped; the
    language is the dump's dbname (enwiki -> en)."""

    name = "wikipedia"
    patterns = ("*.xml", "*.xml.bz2", "*.xml.gz")

    def read(self, path):
        lang = None
        try:
            with open_read(path) as f:
                for _, el in ET.iterparse(f, events=("end",)):
                    tag = _local(el.tag)
                    if tag == "dbname":
                        lang = (el.text or "").removesuffix("wiki")
                    elif tag == "page":
                        page = {_local(c.tag): c for c in el}
                        ns = page.get("ns")
                        rev = page.get("revision")
                        text_el = next((c for c in rev if _local(c.tag) == "text"), None) if rev is not None else None
                        if (ns is None or ns.text == "0") and "redirect" not in page and text_el is not None:
                            code = lang or path.name.split("wiki", 1)[0] or "unknown"
                            yield Document(id=f"{code}/{page['id'].text if 'id' in page else page['title'].text}",
                                           text=text_el.text or "", source="wikipedia",
                                           metadata={"language": code, "title": page["title"].text})
                        el.clear()
        except ET.ParseError as e:
            raise MalformedInput(f"{path}: not a MediaWiki XML dump ({e})") from None


class LanguageFilter(Filter):
    name = "languages"

    def __init__(self, languages=None):
        self.languages = tuple(languages) if languages else LANGUAGES

    def reason(self, doc):
        lang = doc.metadata.get("language")
        return None if lang in self.languages else f"language {lang} not in the list"

    def describe(self):
        return f"keep the languages {', '.join(self.languages)}"


_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "score", "syntaxhighlight", "div"}
_FILE_LINK = re.compile(r"^(file|image|category|datei|fichier|archivo|файл|категория|kategorie|catégorie)\s*:", re.I)


def _mwp():
    try:
        import mwparserfromhell
    except ImportError:
        raise ValueError("the wikipedia source needs mwparserfromhell: pip install 'llamaworks[data]'") from None
    return mwparserfromhell


def wikitext_to_text(wikitext: str) -> str:
    mwp = _mwp()
    code = mwp.parse(wikitext)
    for tpl in code.filter_templates(recursive=False):
        _remove(code, tpl)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).lower() in _DROP_TAGS:
            _remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        if _FILE_LINK.match(str(link.title).strip()):
            _remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    lines = [ln.strip() for ln in text.split("\n")]
    text = "\n".join(ln for ln in lines if ln.strip("=* "))
    return text.strip()


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with a removed parent
        pass


class WikiCleaner(LineCleaner):
    name = "wiki_markup"
    empty_reason = "no text left after removing markup"

    def clean(self, doc):
        text = wikitext_to_text(doc.text)
        return text + "\n" if text else "", {}

    def describe(self):
        return "remove templates, references, tables, comments, files and link markup (keep link text)"
