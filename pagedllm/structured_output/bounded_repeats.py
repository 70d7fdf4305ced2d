"""Rewrite counted repetitions that xgrammar matches slowly into chains of rules that it matches fast.

xgrammar compiles a JSON-schema string with a ``maxLength`` (or a ``minLength``), and a regex such as
``[a-z]{0,40}x``, into a counted repetition of one character class followed by a literal::

    root_prop_1 ::= (("\\"" root_prop_1_characters{1, 24} "\\""))
    root_prop_1_characters ::= (([^\\"\\\\\\r\\n]))

Inside such a repetition, filling a token bitmask tries most of the vocabulary token by token: 0.4 to 10 ms per
row with a 150k-token vocabulary, against ~10 us elsewhere (xgrammar issue #852, open in 0.2.8). The same
language written as a chain of rules, one per number of characters still allowed, with the closing literal
folded into each link::

    chain_k ::= ("\\"") | (root_prop_1_characters chain_{k-1})     (the literal only once the minimum is met)

fills in 20-100 us, since every link's token mask is precomputed when the grammar compiles. (Folding the literal
in matters: a chain that ends in an empty alternative is as slow as the repetition.) Each link costs ~10 ms of
compile time with such a vocabulary, so a grammar gets at most ``MAX_CHAIN_RULES`` links; longer repetitions keep
xgrammar's own form.

The rewrite works on the EBNF text xgrammar prints for a grammar (one rule per line) and leaves everything it
does not recognise as it was. ``has_slow_repeats`` tells whether a grammar still has such a repetition (one over the
chain budget, or not followed by a literal): its masks can then take milliseconds to fill, and the model runner
checks its rows' draws after the fact rather than masking them first (``worker/grammar_sampling``).
"""

from __future__ import annotations

import re

MAX_CHAIN_RULES = 512
# Counted repetitions up to this many characters cost little (e.g. ``[0-9]{3}`` in an integer range); a ``maxLength``
# of 64 already costs ~1 ms per fill on average.
MAX_CHEAP_REPEAT = 16

_RULE = re.compile(r"^(\w+) ::= (.*)$")
# A rule that is one character class, e.g. ``(([^\"\\\r\n]))``.
_CHAR_CLASS_BODY = re.compile(r"^\(\(\[(?:[^\]\\]|\\.)*\]\)\)$")
# The lexical pieces of a rule body: string literals and character classes whole (their contents never match the
# other pieces), counted repetitions of a rule, and any other single character.
_PIECE = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|(\w+)\{(\d+), (-?\d+)\}|\w+|\s+|.')


def rewrite_bounded_repeats(ebnf: str, max_chain_rules: int | None = None) -> str | None:
    """``ebnf`` (as xgrammar prints a grammar) with every ``CLASS_RULE{lo, hi} "literal"`` replaced by a chain of
    rules, as long as the chains stay within ``max_chain_rules`` (default ``MAX_CHAIN_RULES``) rules in all; None
    when nothing was replaced."""
    if max_chain_rules is None:
        max_chain_rules = MAX_CHAIN_RULES
    lines = ebnf.splitlines()
    rules = [_RULE.match(line) for line in lines]
    if not all(rules):
        return None  # not the one-rule-per-line form this reads
    names = {rule.group(1) for rule in rules}
    class_rules = {rule.group(1) for rule in rules if _CHAR_CLASS_BODY.match(rule.group(2))}
    chains = _Chains(names, max_chain_rules)
    rewritten = [f"{rule.group(1)} ::= {_rewrite_body(rule.group(2), class_rules, chains)}" for rule in rules]
    if not chains.rules:
        return None
    return "\n".join(rewritten + chains.rules) + "\n"


def has_slow_repeats(ebnf: str) -> bool:
    """Whether ``ebnf`` repeats a character-class rule a counted number of times over ``MAX_CHEAP_REPEAT``."""
    rules = [_RULE.match(line) for line in ebnf.splitlines()]
    class_rules = {rule.group(1) for rule in rules if rule and _CHAR_CLASS_BODY.match(rule.group(2))}
    for rule in rules:
        for piece in _PIECE.finditer(rule.group(2) if rule else ""):
            lo, hi = int(piece.group(2) or 0), int(piece.group(3) or 0)
            if piece.group(1) in class_rules and max(lo, hi) > MAX_CHEAP_REPEAT:
                return True
    return False


def _rewrite_body(body: str, class_rules: set[str], chains: _Chains) -> str:
    pieces = list(_PIECE.finditer(body))
    out: list[str] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        if (piece.group(1) in class_rules and i + 2 < len(pieces) and pieces[i + 1].group(0) == " "
                and pieces[i + 2].group(0).startswith('"')):
            chain = chains.add(piece.group(1), int(piece.group(2)), int(piece.group(3)), pieces[i + 2].group(0))
            if chain is not None:
                out.append(chain)
                i += 3
                continue
        out.append(piece.group(0))
        i += 1
    return "".join(out)


class _Chains:
    """The chain rules of one grammar: one chain per distinct (class rule, lo, hi, literal)."""

    def __init__(self, taken_names: set[str], max_rules: int) -> None:
        self.rules: list[str] = []
        self._taken = taken_names
        self._max_rules = max_rules
        self._heads: dict[tuple[str, int, int, str], str] = {}

    def add(self, class_rule: str, lo: int, hi: int, literal: str) -> str | None:
        """The name of the chain's first rule, or None if it would take the grammar past ``max_rules``."""
        key = (class_rule, lo, hi, literal)
        if key in self._heads:
            return self._heads[key]
        length = hi + 1 if hi >= 0 else lo + 1
        if (0 <= hi < lo) or len(self.rules) + length > self._max_rules:
            return None
        prefix = self._fresh_prefix(class_rule)
        link = [f"{prefix}_{k}" for k in range(length)]
        if hi >= 0:  # link[k]: at most k more characters, the literal once lo of them are behind
            for k in range(length):
                alternatives = [literal] if hi - k >= lo else []
                alternatives += [f"{class_rule} {link[k - 1]}"] if k > 0 else []
                self._define(link[k], alternatives)
        else:  # link[k]: k more characters needed; link[0] takes any number of them, then the literal
            self._define(link[0], [literal, f"{class_rule} {link[0]}"])
            for k in range(1, length):
                self._define(link[k], [f"{class_rule} {link[k - 1]}"])
        self._heads[key] = link[-1]
        return link[-1]

    def _define(self, name: str, alternatives: list[str]) -> None:
        self.rules.append(f"{name} ::= " + " | ".join(f"({alternative})" for alternative in alternatives))

    def _fresh_prefix(self, class_rule: str) -> str:
        """A prefix that no existing rule name starts with (chain links are ``prefix_k``)."""
        index = len(self._heads)
        while any(name.startswith(f"{class_rule}_chain{index}_") for name in self._taken):
            index += 1
        prefix = f"{class_rule}_chain{index}"
        self._taken.add(f"{prefix}_")
        return prefix
