"""The hot path's storage: fixed-size bucket counters that a step observation updates in well under a microsecond.

Why not the SDK's ``Histogram.record()``? Measured on the project's 2-core machine, one SDK record costs
9-15 µs (about 58 Python calls: attribute cleaning and hashing, a ``Measurement`` object, exemplar filtering,
one storage per reader), while KServe's own prometheus_client ``labels(...).time()`` costs 2.5-6 µs. An
instrumented step must cost less than what KServe users pay today, so observations land here instead: one
``bisect`` and a few increments (in C, atomic under the GIL, when the optional extension is built; else under a
per-series lock: see :mod:`kserve_otel.recording.speedups`). :mod:`kserve_otel.export.metrics_bridge` turns
these counters into ordinary OpenTelemetry ``Histogram`` and ``Sum`` data at collection time, so every SDK
reader and exporter (Prometheus, OTLP, console, in-memory) receives real OpenTelemetry metrics.

Series are process-global and cumulative from their creation; they live as long as the process, so the memory
they take is fixed by the number of (model, step) pairs, never by the number of calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from time import time_ns
from typing import Any, Generic, TypeVar

from ..names import KSERVE_BUCKETS
from .speedups import Counter, Histogram

#: Series per family before new label sets share one overflow series (the SDK's default limit too).
CARDINALITY_LIMIT = 2000
OVERFLOW_ATTRIBUTES = {"otel.metric.overflow": True}


class HistogramSeries(Histogram):
    """Cumulative explicit-bucket histogram of one label set. ``observe`` is the hot path: a
    :class:`kserve_otel.recording.speedups.Histogram` (C when the extension is built) with the series' labels
    and start time.
    """

    __slots__ = ("attributes", "start_time_ns")

    def __init__(self, attributes: dict[str, object], bounds: tuple[float, ...], exemplars: bool = False,
                 native: bool = False) -> None:
        super().__init__(bounds, exemplars, native)
        self.attributes = attributes
        self.start_time_ns = time_ns()


class CounterSeries(Counter):
    """Cumulative counter of one label set (monotonic unless its family is an up-down counter): a
    :class:`kserve_otel.recording.speedups.Counter` (C when the extension is built) with the series' labels
    and start time."""

    __slots__ = ("attributes", "start_time_ns")

    def __init__(self, attributes: dict[str, object]) -> None:
        super().__init__()
        self.attributes = attributes
        self.start_time_ns = time_ns()


class UpDownCounterSeries(CounterSeries):
    """An up-down counter of one label set (requests in flight): ``increment`` and ``decrement`` are one C call
    each, atomic under the GIL, which an HTTP middleware pays on every request. Mirrors only see ``add``."""

    __slots__ = ()


S = TypeVar("S")


class Family(Generic[S]):
    """Series of one instrument, by label values. Creating a series takes the family lock; reading does not."""

    kind = "family"
    #: What :meth:`series` makes, from the series' attributes.
    series_class: Callable[[dict[str, object]], Any]

    def __init__(self, name: str, description: str, unit: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.description = description
        self.unit = unit
        self.label_names = tuple(label_names)
        self._series: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        #: Called with each new series while the family lock is held: the registry's store places its cells.
        self.on_new_series: Callable[[Family, object], None] | None = None

    def series(self, *label_values: str) -> S:
        """The series of these label values (in ``label_names`` order), created on first use."""
        series = self._series.get(label_values)
        if series is None:
            with self._lock:
                series = self._series.get(label_values)
                if series is None:
                    if len(self._series) >= CARDINALITY_LIMIT:
                        return self._get_overflow()
                    series = self._new(dict(zip(self.label_names, label_values)))
                    series.mirror = _mirror_for(self, series.attributes)
                    self._placed(series)
                    self._series[label_values] = series
        return series  # type: ignore[return-value]

    def _get_overflow(self):  # type: ignore[no-untyped-def]
        key = ("\0overflow",)
        series = self._series.get(key)
        if series is None:
            series = self._new(dict(OVERFLOW_ATTRIBUTES))
            series.mirror = _mirror_for(self, series.attributes)
            self._placed(series)
            self._series[key] = series
        return series

    def _placed(self, series: object) -> None:
        hook = self.on_new_series
        if hook is not None:
            hook(self, series)

    def place_all(self, place: Callable[[Family, object], None]) -> None:
        """Call ``place(family, series)`` for every series now, and for each new one from now on (``None``:
        no more calls)."""
        with self._lock:
            self.on_new_series = place
            if place is not None:
                for series in self._series.values():
                    place(self, series)

    def _new(self, attributes: dict[str, object]) -> S:
        return self.series_class(attributes)  # type: ignore[no-any-return]

    def all_series(self) -> list:  # type: ignore[type-arg]
        """Every series, in creation order."""
        return list(self._series.values())


class HistogramFamily(Family[HistogramSeries]):
    """A histogram instrument: one :class:`HistogramSeries` per label set, all with the same bounds."""

    kind = "histogram"

    def __init__(
        self, name: str, description: str, unit: str, label_names: Sequence[str], bounds: Sequence[float],
        exemplars: bool = False, native: bool = False,
    ) -> None:
        super().__init__(name, description, unit, label_names)
        self.bounds = tuple(float(b) for b in bounds)
        #: Whether each series keeps an exemplar per bucket (its latest observation made in a sampled span).
        self.exemplars = exemplars
        #: Whether each series keeps a native (exponential) histogram too, beside the classic buckets.
        self.native = native

    def _new(self, attributes: dict[str, object]) -> HistogramSeries:
        return HistogramSeries(attributes, self.bounds, self.exemplars, self.native)


class CounterFamily(Family[CounterSeries]):
    """A monotonic counter instrument: one :class:`CounterSeries` per label set."""

    kind = "counter"
    series_class = CounterSeries


class UpDownCounterFamily(CounterFamily):
    """A counter that may go down (requests in flight): exported as a non-monotonic sum, always cumulative."""

    kind = "updowncounter"
    series_class = UpDownCounterSeries


#: Makes the mirror of a new series (another metrics system that sees every observation too), if any.
MirrorFactory = Callable[["Family", dict[str, object]], "Callable[[float], object] | None"]
_mirror_factory: MirrorFactory | None = None


def _mirror_for(family: Family, attributes: dict[str, object]) -> Callable[[float], object] | None:
    factory = _mirror_factory
    return factory(family, attributes) if factory is not None else None


def set_mirror_factory(factory: MirrorFactory | None, registry: SeriesRegistry | None = None) -> None:
    """Mirror every observation into another metrics system (Ray's, in Ray Serve replicas): ``factory(family,
    attributes)`` returns the callable that receives each observed value (histograms) or increment (counters)
    of a series, or ``None``. Existing series of ``registry`` (default: the process's) get their mirror now.
    ``None`` removes every mirror."""
    global _mirror_factory
    _mirror_factory = factory
    for family in (registry or REGISTRY).families():
        for series in family.all_series():
            series.mirror = _mirror_for(family, series.attributes)


class SeriesRegistry:
    """All families of this process, by instrument name. Families are created once and never removed."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._lock = threading.Lock()
        #: Bounds given to histogram families created from now on (``configure(buckets=...)`` sets them).
        self.default_bounds: tuple[float, ...] = KSERVE_BUCKETS
        self._place: Callable[[Family, object], None] | None = None

    def histogram(
        self, name: str, description: str, unit: str, label_names: Sequence[str],
        bounds: Sequence[float] | None = None, exemplars: bool = False, native: bool = False,
    ) -> HistogramFamily:
        """The histogram family ``name``, created with ``bounds`` (else :attr:`default_bounds`) on first use;
        with ``exemplars``, each series keeps the latest exemplar of each bucket; with ``native``, a native
        histogram too."""
        return self._family(name, lambda: HistogramFamily(
            name, description, unit, label_names, bounds if bounds is not None else self.default_bounds,
            exemplars, native,
        ))  # type: ignore[return-value]

    def counter(self, name: str, description: str, unit: str, label_names: Sequence[str]) -> CounterFamily:
        """The counter family ``name``, created on first use."""
        return self._family(name, lambda: CounterFamily(name, description, unit, label_names))  # type: ignore[return-value]

    def up_down_counter(self, name: str, description: str, unit: str, label_names: Sequence[str]) -> UpDownCounterFamily:
        """The up-down counter family ``name``, created on first use."""
        return self._family(name, lambda: UpDownCounterFamily(name, description, unit, label_names))  # type: ignore[return-value]

    def _family(self, name, factory):  # type: ignore[no-untyped-def]
        family = self._families.get(name)
        if family is None:
            with self._lock:
                family = self._families.get(name)
                if family is None:
                    family = factory()
                    if self._place is not None:
                        family.place_all(self._place)
                    self._families[name] = family
        return family

    def place_series(self, place: Callable[[Family, object], None] | None) -> None:
        """Call ``place(family, series)`` for every series of every family now and for every new one from now
        on, while its family's lock is held: how a :class:`kserve_otel.export.series_files.SeriesFile` moves
        the cells into memory other processes read. ``None`` stops the calls."""
        with self._lock:
            self._place = place
            for family in self._families.values():
                family.place_all(place)

    def families(self) -> list[Family]:
        """Every family, in creation order."""
        return list(self._families.values())

    def get(self, name: str) -> Family | None:
        """The family called ``name``, if any series of it was ever asked for."""
        return self._families.get(name)


#: The process's registry, fed by every way in (decorator, KServe, Ray Serve, ASGI).
REGISTRY = SeriesRegistry()
