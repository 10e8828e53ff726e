"""Compiling for a TPU slice on any machine, and what the compiled program says about it.

libtpu (requirements-dev.txt) gives compile-only devices for a slice that is not here:

  mesh = sharding.make_mesh((-1, 1, 1), devices=tpu.devices("v4-32"))
  args = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)), ...
  compiled = tpu.compile(jax.jit(step).lower(*args), "v4-32")
  print(tpu.format_table([tpu.analyze(compiled, "v4-32", useful_flops=..., tokens_per_step=...)]))

The real TPU compiler runs, so the HBM each chip needs is the compiler's own figure. The FLOPs
and bytes are XLA's cost model, and the time they give is a roofline bound, not a measurement:
see `Report`. Nothing here loads libtpu until `devices` is called.

With libtpu installed, JAX also probes for a TPU when a CPU program starts its backends (0.15 s,
and five lines of libtpu's complaints on stderr); JAX_PLATFORMS=cpu skips that, and `devices`
still works.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import tempfile

import jax
from absl import logging
from jax.experimental import topologies

from distil_jax import errors

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: JAX shows a megacore chip (two TensorCores) as one device."""
  kind: str  # jax.Device.device_kind.
  cores: int  # TensorCores per chip.
  hbm_gib: float  # Published HBM per chip.
  usable_hbm_gib: float  # What XLA lets a program use (libtpu 0.0.42.1's "available HBM").
  peak_flops: float  # Dense bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.


# Google's per-chip figures: cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GBps),
# /v5e (197 TFLOP/s, 16 GB, 819 GBps), /v5p (459 TFLOP/s, 95 GB, 2765 GBps), /v6e (918 TFLOP/s,
# 32 GB, 1638 GBps). The usable HBM is from the compiler's out-of-memory message.
CHIPS = {
    "v4": Chip("TPU v4", 2, 32, 30.75, 275e12, 1200e9),
    "v5e": Chip("TPU v5 lite", 1, 16, 15.75, 197e12, 819e9),
    "v5p": Chip("TPU v5", 2, 95, 95.74, 459e12, 2765e9),
    "v6e": Chip("TPU v6 lite", 1, 32, 31.25, 918e12, 1638e9),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A slice as Cloud names it: v4 and v5p count TensorCores (two per chip), v5e and v6e chips."""
  name: str
  family: str
  topology: str  # Chips along each axis, e.g. "2x2x4".
  host_bounds: tuple[int, int, int]  # Chips per host along each axis.

  @property
  def chip(self) -> Chip:
    return CHIPS[self.family]

  @property
  def chips(self) -> int:
    return math.prod(int(n) for n in self.topology.split("x"))

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.host_bounds)


def _slice(family: str, topology: str) -> Slice:
  chips = math.prod(int(n) for n in topology.split("x"))
  # v4 and v5p hosts have 2x2x1 chips; v5e and v6e hosts 8 (2x4), or fewer in the small slices.
  bounds = (2, 2, 1) if CHIPS[family].cores == 2 else {1: (1, 1, 1), 4: (2, 2, 1)}.get(
      chips, (2, 4, 1))
  return Slice(f"{family}-{chips * CHIPS[family].cores}", family, topology, bounds)


SLICES = {s.name: s for s in (
    *(_slice(f, t) for f in ("v4", "v5p") for t in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4")),
    *(_slice(f, t) for f in ("v5e", "v6e")
      for t in ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")))}


def get_slice(name: str) -> Slice:
  """The slice called `name` (Cloud's "v5litepod-8" is "v5e-8")."""
  name = name.replace("v5litepod-", "v5e-")
  if name not in SLICES:
    raise errors.ConfigError(f"unknown TPU slice {name!r}: known slices are {', '.join(SLICES)}")
  return SLICES[name]


@contextlib.contextmanager
def _quiet_libtpu_start():
  """Starts libtpu beside other processes that loaded it (a CPU program's JAX probes for a TPU
  and holds libtpu's lock), and keeps its complaints about the missing TPU VM off stderr."""
  allow = os.environ.get("ALLOW_MULTIPLE_LIBTPU_LOAD")
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  sys.stderr.flush()
  stderr = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      os.dup2(stderr, 2)
      os.close(stderr)
      if allow is None:
        del os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"]
      else:
        os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = allow
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        logging.log(logging.WARNING if failed else logging.DEBUG, "libtpu: %s", line)


@functools.cache
def _devices(name: str) -> tuple[jax.Device, ...]:
  s = SLICES[name]
  if importlib.util.find_spec("libtpu") is None and "TPU_LIBRARY_PATH" not in os.environ:
    raise errors.UserError("compiling for a TPU slice needs libtpu: pip install -r "
                           "requirements-dev.txt (Linux x86_64 only)")
  options = {"chip_config_name": "megacore"} if s.chip.cores == 2 else {}
  with _quiet_libtpu_start():
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{s.family}:{s.topology}", num_slices=1,
        chips_per_host_bounds=s.host_bounds, **options)
  return tuple(topology.devices)


def devices(name: str) -> list[jax.Device]:
  """Compile-only devices of slice `name`, one per chip; they run nothing, but compile."""
  return list(_devices(get_slice(name).name))


class DoesNotFit(errors.ConfigError):
  """XLA refused the program: its buffers need more memory per device than the devices have.

  `name` is a slice's (or the devices' kind); `advice` says what fits, when the caller knows."""

  def __init__(self, name: str, compiler_message: str, advice: str = ""):
    self.slice_name, self.compiler_message = name, compiler_message
    self.needed_bytes = self.usable_bytes = None
    found = re.search(r"\(([\d.]+)G\) exceeds? available HBM \(([\d.]+)G\)", compiler_message)
    advice = advice or "shard it over more chips, or use a smaller batch or a bigger slice"
    if found:
      self.needed_bytes, self.usable_bytes = (float(g) * GIB for g in found.groups())
      super().__init__(f"the program does not fit a {name}: it needs {found[1]} GiB of HBM per "
                       f"chip, more than the {found[2]} GiB XLA can use; {advice}")
    else:
      super().__init__(f"the program does not fit a {name}: "
                       f"{compiler_message.splitlines()[0]}; {advice}")


def compile(lowered: jax.stages.Lowered, name: str) -> jax.stages.Compiled:
  """`lowered.compile()` for slice `name` (or, on the devices a program runs on, their kind);
  raises `DoesNotFit` where XLA runs out of memory, and for a slice also where the program's
  buffers (`Report.total_bytes`) add up to more than a chip's usable HBM although XLA compiled
  it (seen with 8 bert_base runs fused on a v4-32: 32.56 GiB of 30.75), rather than risk an
  out-of-memory on the slice.

  A program for a slice stays out of JAX's persistent compilation cache: a compile-only
  executable cannot be loaded back from it (without a TPU), so each entry would only warn and
  take space.
  """
  if name.replace("v5litepod-", "v5e-") not in SLICES:  # Devices of this machine: cached.
    return _refusing_too_big(lowered.compile, name)
  name = get_slice(name).name
  option = "jax_persistent_cache_min_compile_time_secs"
  saved = getattr(jax.config, option)
  jax.config.update(option, math.inf)
  try:
    compiled = _refusing_too_big(lowered.compile, name)
  finally:
    jax.config.update(option, saved)
  report = analyze(compiled, name)
  if not report.fits:
    raise DoesNotFit(name, f"its arguments, outputs, temporaries and code "
                           f"({report.total_bytes / GIB:.2f}G) exceed available HBM "
                           f"({report.hbm_bytes / GIB:.2f}G)")
  return compiled


def _refusing_too_big(compile_fn, name: str) -> jax.stages.Compiled:
  try:
    return compile_fn()
  except jax.errors.JaxRuntimeError as e:
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    raise DoesNotFit(name, str(e)) from None


@dataclasses.dataclass(frozen=True)
class Cost:
  """XLA's count of the work of one device's program."""
  flops: float
  bytes_accessed: float

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> "Cost":
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return cls(float(analysis.get("flops", 0)), float(analysis.get("bytes accessed", 0)))


def loop_corrected(total: Cost, loop_free: Cost, trips: int) -> Cost:
  """The cost of a program whose loop runs `trips` times, from XLA's `total`, which counts the
  loop's body once (a `lax.scan` over micro-batches), and the cost of the rest alone (e.g. the
  optimizer update after the loop): total + (trips - 1) * (total - loop_free).

  FLOPs do not depend on how XLA fuses ops, so this recovers them; bytes do, and the loop-free
  part fuses differently alone, so the corrected bytes are an estimate of the loop's traffic.
  """
  if trips < 1:
    raise errors.ConfigError(f"a loop runs at least once, not {trips} times")
  body = Cost(total.flops - loop_free.flops, total.bytes_accessed - loop_free.bytes_accessed)
  if body.flops < 0 or body.bytes_accessed < 0:
    raise errors.ConfigError(f"the loop-free part of the program ({loop_free}) costs more than "
                             f"the whole ({total})")
  return Cost(total.flops + (trips - 1) * body.flops,
              total.bytes_accessed + (trips - 1) * body.bytes_accessed)


@dataclasses.dataclass(frozen=True)
class Report:
  """A compiled step on one slice, per chip (per device: one device is one chip).

  Memory is the compiler's buffer assignment, TPU layouts' padding included (f32 arrays' last two
  dimensions to multiples of 8 and 128): `total_bytes` (arguments, outputs not written over
  donated arguments, temporaries, code) of the chip's usable `hbm_bytes`. Where XLA itself finds
  the buffers too big, `compile` raises `DoesNotFit` instead.
  `bound_seconds` is the roofline bound: the step cannot take less than its FLOPs at the chip's
  peak, nor less than its HBM traffic at the chip's bandwidth. It is a best case, not a forecast:
  it leaves out collectives over ICI, the host and the input pipeline, and assumes compute and
  memory traffic overlap perfectly; XLA's `bytes_accessed` is an estimate from the HLO (every
  operand and result of every fused op). So `mfu` is the best MFU this program could reach on
  the slice; a measured MFU needs a real slice.
  """
  slice_name: str
  chips: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # Outputs written over donated arguments.
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int  # Usable HBM of one chip.
  flops: float  # Per chip and step, loop-corrected.
  bytes_accessed: float  # Per chip and step, loop-corrected.
  peak_flops: float
  hbm_bandwidth: float
  useful_flops: float | None = None  # The model's FLOPs per chip and step, as the caller counts.
  tokens_per_step: float | None = None  # Over the whole slice.

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

  @property
  def flops_seconds(self) -> float:
    return self.flops / self.peak_flops

  @property
  def hbm_seconds(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def bound_seconds(self) -> float:
    return max(self.flops_seconds, self.hbm_seconds)

  @property
  def bound_by(self) -> str:
    return "flops" if self.flops_seconds >= self.hbm_seconds else "hbm"

  @property
  def mfu(self) -> float | None:
    """The model FLOP utilization if the step took `bound_seconds`."""
    if self.useful_flops is None:
      return None
    return self.useful_flops / (self.bound_seconds * self.peak_flops)

  @property
  def tokens_per_second_per_chip(self) -> float | None:
    if self.tokens_per_step is None:
      return None
    return self.tokens_per_step / self.chips / self.bound_seconds

  def as_dict(self) -> dict:
    derived = ("total_bytes", "fits", "flops_seconds", "hbm_seconds", "bound_seconds", "bound_by",
               "mfu", "tokens_per_second_per_chip")
    return dataclasses.asdict(self) | {k: getattr(self, k) for k in derived}


def analyze(compiled: jax.stages.Compiled, name: str, *, loop_trips: int = 1,
            loop_free_cost: Cost | None = None, useful_flops: float | None = None,
            tokens_per_step: float | None = None) -> Report:
  """The `Report` of a program compiled for slice `name`.

  A program with a loop of `loop_trips` trips (gradient accumulation) needs `loop_free_cost`,
  the cost of its part outside the loop compiled alone (`Cost.of`), unless all of it is the
  loop. `useful_flops` (per chip and step) gives the MFU, `tokens_per_step` the tokens/s.
  """
  s = get_slice(name)
  memory = compiled.memory_analysis()
  cost = loop_corrected(Cost.of(compiled), loop_free_cost or Cost(0, 0), loop_trips)
  return Report(
      slice_name=s.name, chips=s.chips, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
      hbm_bytes=int(s.chip.usable_hbm_gib * GIB), flops=cost.flops,
      bytes_accessed=cost.bytes_accessed, peak_flops=s.chip.peak_flops,
      hbm_bandwidth=s.chip.hbm_bandwidth, useful_flops=useful_flops,
      tokens_per_step=tokens_per_step)


def format_table(rows: list[Report | DoesNotFit]) -> str:
  """A markdown table of reports, and of programs that did not fit (one row per slice)."""
  lines = ["| slice | chips | HBM/chip GiB (usable) | args GiB | temps GiB | TFLOP/chip | "
           "GB/chip | bound ms | bound by | best MFU | tokens/s/chip |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
  for r in rows:
    if isinstance(r, DoesNotFit):
      need = "?" if r.needed_bytes is None else f"{r.needed_bytes / GIB:.2f}"
      usable = get_slice(r.slice_name).chip.usable_hbm_gib
      lines.append(f"| {r.slice_name} | {get_slice(r.slice_name).chips} | {need} ({usable:.2f}): "
                   "does not fit | - | - | - | - | - | - | - | - |")
      continue
    mfu = "-" if r.mfu is None else f"{r.mfu:.0%}"
    tokens = "-" if r.tokens_per_second_per_chip is None else f"{r.tokens_per_second_per_chip:,.0f}"
    lines.append(
        f"| {r.slice_name} | {r.chips} | {r.total_bytes / GIB:.2f} ({r.hbm_bytes / GIB:.2f})"
        f"{'' if r.fits else ': does not fit'} | {r.argument_bytes / GIB:.2f} | "
        f"{r.temp_bytes / GIB:.2f} | {r.flops / 1e12:.3g} | {r.bytes_accessed / 1e9:.3g} | "
        f"{r.bound_seconds * 1e3:.3g} | {r.bound_by} | {mfu} | {tokens} |")
  return "\n".join(lines)
