"""The policy interface every served, replayed or local policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ValidationError
from ..types import ModalityConfigs, ModalityDims
from . import batching, validation

Observation = dict[str, Any]
Action = dict[str, Any]
Info = dict[str, Any]


@dataclass
class ActionRequest:
    """One client's ``get_action`` call as a server hands it to :meth:`BasePolicy.serve_batch`."""

    observation: Observation
    options: dict | None = None
    client: str = ""
    """Who sent it (stable per connection); policies with per-client state key it by this."""




class BasePolicy(ABC):
    """``get_action(observation, options) -> (action, info)``, ``reset(options) -> info``.

    With ``strict=True`` observations and actions are validated against ``get_modality_config()``
    (and ``get_modality_dims()`` where the policy declares sizes); failures raise
    :class:`policyserve.errors.ValidationError`.

    Serving: a policy whose batch rows are independent sets ``batchable = True``; the server then
    merges ``get_action`` requests from different clients whose ``options`` are equal (apart from
    the keys in ``row_options``) into one :meth:`serve_batch` call. Stateful policies (replay)
    keep ``batchable = False`` and are called once per request. :meth:`get_action`/:meth:`_get_action`
    are the user-facing call and the one a policy implements; the server only calls :meth:`serve_batch`
    and :meth:`serve_reset`.
    """

    batchable: bool = False
    row_options: frozenset[str] = frozenset()
    """Option keys that may differ between merged requests: the merged call gets them as a list with
    one value per batch row (e.g. ``seed``; None for rows whose request lacks the key)."""
    capabilities: frozenset[str] = frozenset()
    """What the policy can do beyond a plain ``get_action``: ``"rtc"`` = real-time chunking (it inpaints
    a committed action prefix given as ``options["rtc"]``, see ``policyserve.model.rtc``)."""

    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict

    @abstractmethod
    def get_modality_config(self) -> ModalityConfigs:
        """Modality name -> ModalityConfig this policy consumes and produces."""

    def get_modality_dims(self) -> ModalityDims:
        """Per-key image sizes and state/action dimensions the policy declares (none by default)."""
        return ModalityDims()

    @abstractmethod
    def _get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        """Compute actions for a validated observation."""

    def reset(self, options: dict | None = None) -> Info:
        """Reset per-episode state; stateless policies return ``{}``."""
        return {}

    def check_observation(self, observation: Observation) -> int:
        return validation.check_observation(observation, self.get_modality_config(), self.get_modality_dims())

    def check_action(self, action: Action, batch_size: int | None = None) -> int:
        return validation.check_action(action, self.get_modality_config(), self.get_modality_dims(), batch_size)

    def check_options(self, options: dict | None, batch_size: int | None = None) -> None:
        """Raise :class:`ValidationError` for ``get_action`` options this policy cannot honour.

        By default only refuses ``options["rtc"]`` when ``"rtc"`` is not in :attr:`capabilities`.
        """
        if options and "rtc" in options and "rtc" not in self.capabilities:
            raise ValidationError("options", "rtc", "no 'rtc' option: this policy cannot inpaint a committed "
                                  "action prefix (real-time chunking)", f"an rtc option for {type(self).__name__}")

    def split_row_option(self, key: str, value: Any, rows: int) -> list[Any]:
        """One request's value of row option ``key`` as one value per batch row (the same value by default)."""
        return [value] * rows

    def get_action(self, observation: Observation, options: dict | None = None) -> tuple[Action, Info]:
        batch_size = self.check_observation(observation) if self.strict else None
        self.check_options(options, batch_size)
        action, info = self._get_action(observation, options)
        if self.strict:
            self.check_action(action, batch_size or None)
        return action, info

    # -- serving ---------------------------------------------------------------------------------
    def serve_reset(self, options: dict | None = None, client: str = "") -> Info:
        """``reset`` as the server calls it, knowing which client asked."""
        return self.reset(options)

    def serve_batch(self, requests: Sequence[ActionRequest]) -> list[tuple[Action, Info] | Exception]:
        """Answer several clients' ``get_action`` requests, in one policy call when they can be merged.

        Each request is validated on its own, so one bad request fails alone; the outcome per request
        is ``(action, info)`` or the exception it raised.
        """
        if len(requests) == 1:
            return [self._outcome(lambda: self.get_action(requests[0].observation, requests[0].options))]
        outcomes: list[tuple[Action, Info] | Exception | None] = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                rows = self.check_observation(request.observation) if self.strict else None
                self.check_options(request.options, rows)
                valid.append(i)
            except Exception as exc:  # noqa: BLE001 - reported to that request's client only
                outcomes[i] = exc
        if valid:
            for i, outcome in zip(valid, self._merged_call([requests[i] for i in valid])):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _merged_call(self, requests: Sequence[ActionRequest]) -> list[tuple[Action, Info] | Exception]:
        observations = [r.observation for r in requests]
        merged, sizes = batching.merge_observations(observations)
        options = merge_row_options([r.options for r in requests], sizes, self.row_options, self.split_row_option)
        try:
            action, info = self._get_action(merged, options)
            if self.strict:
                self.check_action(action, sum(sizes))
            parts = batching.split_rows(action, sizes)
        except Exception as exc:  # noqa: BLE001 - the call failed for every merged request
            return [exc] * len(requests)
        return [(part, dict(info)) for part in parts]

    @staticmethod
    def _outcome(call: Any) -> tuple[Action, Info] | Exception:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - returned, not raised: the server answers it
            return exc


class PolicyWrapper(BasePolicy):
    """A policy that adapts another one; forwards reset, modality config and dims."""

    def __init__(self, policy: BasePolicy, *, strict: bool = True) -> None:
        super().__init__(strict=strict)
        self.policy = policy

    def get_modality_config(self) -> ModalityConfigs:
        return self.policy.get_modality_config()

    def get_modality_dims(self) -> ModalityDims:
        return self.policy.get_modality_dims()

    def reset(self, options: dict | None = None) -> Info:
        return self.policy.reset(options)

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return self.policy.batchable

    @property
    def row_options(self) -> frozenset[str]:  # type: ignore[override]
        return self.policy.row_options

    @property
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        return self.policy.capabilities

    def check_options(self, options: dict | None, batch_size: int | None = None) -> None:
        self.policy.check_options(options, batch_size)

    def split_row_option(self, key: str, value: Any, rows: int) -> list[Any]:
        return self.policy.split_row_option(key, value, rows)


def merge_key(options: dict | None, row_options: frozenset[str]) -> Any:
    """Requests whose merge keys are equal can share one policy call (see ``BasePolicy.row_options``).

    Row options are left out (requests with and without them merge); other options holding anything
    but plain values (arrays, say) get a key equal to no other.
    """
    if not options:
        return ()
    try:
        return tuple(sorted((k, _frozen(v)) for k, v in options.items() if k not in row_options))
    except TypeError:
        return object()


def _frozen(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    raise TypeError(type(value).__name__)


def merge_row_options(options: list[dict | None], sizes: list[int], row_options: frozenset[str],
                      split: Callable[[str, Any, int], list[Any]] | None = None) -> dict | None:
    """The options of a merged call: shared keys once, ``row_options`` keys as one value per row.

    ``split(key, value, rows)`` turns one request's row-option value into its rows' values (default:
    repeated); rows of requests without the key get None.
    """
    given = [opts for opts in options if opts]
    if not given:
        return options[0]
    merged = {k: v for k, v in given[0].items() if k not in row_options}
    for key in sorted(row_options & set().union(*(opts.keys() for opts in given))):
        values: list[Any] = []
        for opts, size in zip(options, sizes):
            value = (opts or {}).get(key)
            values += [None] * size if value is None else (split(key, value, size) if split else [value] * size)
        merged[key] = values
    return merged
