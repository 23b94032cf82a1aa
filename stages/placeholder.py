"""Deterministic placeholder outputs for the offline LLM provider.

Well-formed, on-topic and of the requested length so every downstream check runs, but
plainly placeholder: every result made from them carries ``OFFLINE_WARNING``.
"""

from __future__ import annotations

from core.requests import BlogRequest
from stages.budget import FAQ_COUNT, SECTION_COUNT, body_words, scale_budgets
from stages.markdown_doc import slugify
from stages.models import (
    Fact,
    Outline,
    OutlineSection,
    OutlineSubsection,
    Perspective,
    ResearchBrief,
    SeoCopy,
    SuggestedSource,
)
from stages.quality import normalise_paragraph

_SECTION_HEADINGS = (
    "What {Kw} Means Today",
    "Why It Matters",
    "Key Factors to Consider",
    "How to Get Started",
    "Practical Examples",
    "Common Mistakes to Avoid",
    "Tools and Resources",
    "Measuring Results",
    "Final Thoughts",
)
_SENTENCES = (
    "Many readers start with {kw} because it shapes every later decision.",
    "This part of the guide looks at {section} in plain terms.",
    "A clear plan makes {section} easier to handle from day one.",
    "Small steps taken early often save a lot of time later on.",
    "It helps to write down what you want to achieve before you begin.",
    "Experts suggest you compare at least two options side by side.",
    "Good notes make it simple to see what works and what does not.",
    "Most people find that {secondary} fits well into this picture.",
    "Try to keep the goal simple so the results stay easy to measure.",
    "A short review each week keeps the work on track.",
    "Ask for feedback from people who have done this before.",
    "Costs and time both matter, so weigh them together.",
    "The best choice is the one that suits your own needs.",
    "Clear examples make the ideas in {section} easier to apply.",
)
_FAQ_TEMPLATES = (
    "What is the best way to start with {kw}?",
    "How long does it take to see results from {kw}?",
    "Is {kw} worth it for beginners?",
    "What mistakes should you avoid with {kw}?",
    "How much does {kw} cost?",
)


def _title_case(text: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in text.split())


def placeholder_research(request: BlogRequest) -> ResearchBrief:
    """A research brief built from the request alone."""
    kw = request.keywords[0]
    base = slugify(kw) or "topic"
    audience = request.target_audience or "general readers"
    labels = ("An Overview", "Key Statistics", "Expert Guidance")
    questions = [template.format(kw=kw) for template in _FAQ_TEMPLATES]
    return ResearchBrief(
        summary=f"An overview of {request.topic} for {audience}, centred on {kw}.",
        search_intent="informational",
        perspectives=[
            Perspective(perspective="A beginner", questions=questions[:2]),
            Perspective(perspective="A careful buyer", questions=questions[2:4]),
            Perspective(perspective="An experienced practitioner", questions=questions[4:]),
        ],
        key_points=[
            f"What {kw} is and why it matters",
            f"The main factors to weigh when choosing {kw}",
            "Practical steps to get started",
            "Common mistakes and how to avoid them",
            "How to measure results",
        ],
        audience_insights=[f"{_title_case(audience)} want clear, practical advice."],
        questions=questions,
        semantic_keywords=[f"{kw} guide", f"{kw} tips", f"best {kw}", f"{kw} examples"],
        facts=[
            Fact(claim=f"Placeholder claim about {label.lower()} of {kw}.", source_ids=[f"S{n}"])
            for n, label in enumerate(labels, start=1)
        ],
        entities=[_title_case(kw)],
        competitor_headings=[f"What Is {_title_case(kw)}?", f"How to Choose {_title_case(kw)}"],
        sources=[
            SuggestedSource(
                id=f"S{n}",
                title=f"{_title_case(kw)}: {label}",
                url=f"https://example.com/{base}/{slugify(label)}",
                snippet=f"Placeholder source about {label.lower()} of {kw}.",
            )
            for n, label in enumerate(labels, start=1)
        ],
    )


def placeholder_outline(
    request: BlogRequest, questions: list[str], source_ids: list[str] | None = None
) -> Outline:
    """An outline with the request's section count and a budget fitting its length band."""
    ids = source_ids or []
    kw = request.keywords[0]
    count = SECTION_COUNT[request.length]
    faq = questions[: FAQ_COUNT[request.length]] if request.include_faq_section else []
    headings = [h.format(Kw=_title_case(kw)) for h in _SECTION_HEADINGS[: count - 1]]
    headings.append(_SECTION_HEADINGS[-1])
    budgets = scale_budgets([2] + [3] * count, body_words(request, count, len(faq)))
    title = request.topic
    if kw.lower() not in title.lower() and len(title) + len(kw) + 2 <= 70:
        title = f"{_title_case(kw)}: {title}"
    return Outline(
        title=title,
        intro_target_words=budgets[0],
        sections=[
            OutlineSection(
                heading=heading,
                target_words=budget,
                key_points=[f"Explain {heading.lower()}"],
                source_ids=[ids[index]] if index < len(ids) else [],
                subsections=(
                    [OutlineSubsection(heading=f"{heading}: First Steps", key_points=[])]
                    if index == 1
                    else []
                ),
            )
            for index, (heading, budget) in enumerate(zip(headings, budgets[1:], strict=True))
        ],
        faq_questions=faq,
    )


class _Prose:
    """Writes unique placeholder sentences, rotating templates and keywords."""

    def __init__(self, keywords: list[str]) -> None:
        self.keywords = keywords
        self.count = 0
        self.seen: set[str] = set()

    def unique(self, paragraph: str, section: str) -> str:
        """The paragraph, extended if it happens to repeat an earlier one verbatim."""
        extra = 0
        key = normalise_paragraph(paragraph)
        while key in self.seen:
            extra += 1
            paragraph += f" Point {extra} applies to {section.lower()} in particular."
            key = normalise_paragraph(paragraph)
        self.seen.add(key)
        return paragraph

    def sentence(self, section: str) -> str:
        index = self.count
        self.count += 1
        template = _SENTENCES[(index * 5) % len(_SENTENCES)]
        others = self.keywords[1:] or ["careful planning"]
        secondary = others[index % len(others)]
        return template.format(kw=self.keywords[0], section=section.lower(), secondary=secondary)

    def paragraphs(self, section: str, target: int, cite: list[int]) -> list[str]:
        """Paragraphs of about ``target`` words; the first cites ``cite`` numbers."""
        result: list[str] = []
        written = 0
        current: list[str] = []
        while written < target:
            sentence = self.sentence(section)
            if not result and not current and cite:
                sentence = sentence[:-1] + " " + "".join(f"[{n}]" for n in cite) + "."
            current.append(sentence)
            written += len(sentence.split())
            if len(current) == 4:
                result.append(self.unique(" ".join(current), section))
                current = []
        if current:
            result.append(self.unique(" ".join(current), section))
        return result


def placeholder_draft(request: BlogRequest, outline: Outline, source_count: int) -> str:
    """Markdown following the outline, citing every source once when citations are on."""
    prose = _Prose(list(request.keywords))
    sources = list(range(1, source_count + 1)) if request.use_citations else []
    kw = request.keywords[0]
    lines = [f"# {outline.title}", ""]
    intro = prose.paragraphs("the basics", max(outline.intro_target_words - 20, 10), [])
    covers = ", ".join(request.keywords[1:])
    opening = f"This guide explains {kw} step by step, with practical advice you can use."
    if covers:
        opening += f" Along the way it covers {covers}."
    lines += [opening, ""]
    lines += [paragraph + "\n" for paragraph in intro]
    for index, section in enumerate(outline.sections):
        cite = [sources[index]] if index < len(sources) else []
        lines += [f"## {section.heading}", ""]
        budget = section.target_words
        subsections = section.subsections
        share = budget // (len(subsections) + 1)
        lines += [p + "\n" for p in prose.paragraphs(section.heading, share, cite)]
        if index == 1:
            lines += [
                f"- Check how {kw} fits your goals.",
                "- Compare a few options.",
                "- Keep notes as you go.",
                "",
            ]
        for sub in subsections:
            lines += [f"### {sub.heading}", ""]
            lines += [p + "\n" for p in prose.paragraphs(sub.heading, share, [])]
    # Cite the sources no section picked up, so each reference is used.
    leftover = sources[len(outline.sections) :]
    if leftover:
        lines += [
            f"Further reading on {kw} is listed below {''.join(f'[{n}]' for n in leftover)}.",
            "",
        ]
    if outline.faq_questions:
        lines += ["## Frequently Asked Questions", ""]
        for question in outline.faq_questions:
            answer = prose.unique(" ".join(prose.sentence(question) for _ in range(2)), question)
            lines += [f"### {question}", "", answer, ""]
    return "\n".join(lines).strip() + "\n"


def placeholder_seo(request: BlogRequest, title: str) -> SeoCopy:
    """Snippet copy of compliant length around the primary keyword."""
    kw = request.keywords[0]
    meta_title = f"{_title_case(kw)}: A Practical Guide"
    if len(meta_title) > 60:
        meta_title = _title_case(kw)[:60]
    description = (
        f"Learn about {kw}: key factors, first steps, mistakes to avoid and answers to "
        "common questions."
    )
    if len(description) > 160:
        description = f"{description[:150].rsplit(' ', 1)[0]}…"
    return SeoCopy(
        meta_title=meta_title,
        meta_description=description,
        semantic_keywords=[f"{kw} guide", f"{kw} checklist", f"how to choose {kw}"],
    )
