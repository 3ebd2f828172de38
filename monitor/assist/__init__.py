"""Assistance for reviewers: the contract (:class:`Assistant`, :class:`Hint`) and its registry.

>>> from typing import ClassVar
>>> from monitor.assist import EpisodeView, Hint, make, register
>>> class LengthNote:
...     name: ClassVar[str] = "length_note"
...     def hints(self, episode, ctx):
...         return [Hint(assistant=self.name, kind="note", text=f"{len(episode.response)} characters")]
>>> register("length_note", lambda params: LengthNote())
>>> make("length_note").hints(EpisodeView("e1", "chat", "Hi", "Hello there"), None)[0].text
'11 characters'
"""

from monitor.assist.base import (
    MAX_HINT_CHARS,
    MAX_HINTS,
    Assistant,
    AssistantFactory,
    AssistContext,
    EpisodeView,
    Hint,
    HintField,
    HintKind,
    make,
    register,
    registered,
)
from monitor.assist.builtin import BUILTIN, RM_SCORE, register_builtins
from monitor.assist.experiment import assign, assistants_of, condition_of, uniform
from monitor.assist.run import Assistance, check_experiment, used_assistants

# The built-in assistants (rm_score, drift_signals, neighbours) are there for every importer.
register_builtins()

__all__ = [
    "BUILTIN",
    "MAX_HINTS",
    "MAX_HINT_CHARS",
    "RM_SCORE",
    "AssistContext",
    "Assistance",
    "Assistant",
    "AssistantFactory",
    "EpisodeView",
    "Hint",
    "HintField",
    "HintKind",
    "assign",
    "assistants_of",
    "check_experiment",
    "condition_of",
    "make",
    "register",
    "register_builtins",
    "registered",
    "uniform",
    "used_assistants",
]
