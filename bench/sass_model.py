"""Read the sm_90 SASS of a compiled kernel and turn it into a per-launch H100 cost: a MODEL.

Input: the text of ``cuobjdump -sass`` of a cubin (``isreshape_triton.dev.aot.compile_spec(spec,
sass=True)`` adds it to the report row), optionally with the ``nvdisasm -g`` text of the same
cubin for source lines. Parsing:

* functions (``Function : name``), instructions (``/*addr*/ [@P] OPCODE operands ;``), branch
  targets (hex addresses from cuobjdump, ``.L_x_N`` labels from nvdisasm);
* basic blocks and the control-flow graph from the entry (unreachable code, e.g. the ``BRA self``
  after the last ``EXIT`` and subroutines only reached by ``CALL``, is left out);
* loops: natural loops of the back edges (an edge u→h where h dominates u), merged per header,
  nested by body inclusion; an *innermost* loop contains no other loop;
* per loop iteration (every instruction of the body once, both sides of an if: an upper bound):
  instructions, ``BAR.*``, ``SHFL``, ``MUFU``, FP64 ops, global loads/stores with their width,
  and two latency figures:
  - ``load_chain``: the longest chain of global loads whose address or predicate depends on an
    earlier load's result in the same iteration (e.g. loads predicated on a loaded mask value);
  - ``mem_waits``: memory round trips a warp sits through in one iteration with in-order issue:
    walking the body in address order, the first instruction that reads the result of a load
    still in flight waits for it, and every load then in flight is taken to arrive with it;
    ``wait_gaps`` holds, per wait, the instructions its warp issued since that load (a load issued
    early, e.g. a tile ahead, has less of its round trip left to wait).

The *tile loop* of a kernel is the innermost loop whose back edge is on a source line that
matches ``tile_pattern`` (default :data:`TILE_LOOP`, ``BLOCK_T``: the loss kernels' token loops;
with ``nvdisasm -g`` line info), else the innermost loop that moves the most
global bytes per iteration. Its ancestors are the piece loop (its parent) and the work-item loop
(the outermost one); ``kernel_structure`` splits the function into these regions.

The H100 constants and the timing rule are in :data:`H100` and :func:`launch_time`; every
assumption is printed by :func:`assumptions_text`.
"""
from __future__ import annotations

import functools
import math
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# ----------------------------------------------------------------------------- parsing

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_NV_FUNC = re.compile(r"^\s*\.text\.(\S+?):\s*$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):\s*$")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:\{\s*)?(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_REG = re.compile(r"(?<![\w.])(U?R\d+|U?P\d+|UPR|PR)(\.64|\.128)?(?![\w])")
_TARGET = re.compile(r"(0x[0-9a-fA-F]+)|`\((\.L_\w+)\)")

BRANCHES = ("BRA", "JMP", "BRX", "JMX")
_NO_DEST = {"ST", "STG", "STS", "STL", "RED", "REDG", "BAR", "BRA", "BRX", "JMP", "JMX", "EXIT", "RET",
            "CALL", "BSSY", "BSYNC", "BREAK", "WARPSYNC", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "CCTLL", "NOP",
            "BPT", "YIELD", "NANOSLEEP", "DEPBAR", "KILL", "BMOV", "UCGABAR_ARV", "UCGABAR_WAIT", "SYNCS",
            "STSM"}
_SETP = re.compile(r"^U?(I|F|D|H|HF|B)?SETP|^U?PLOP3")
GLOBAL_LOADS = {"LDG", "LD", "LDGSTS"}
GLOBAL_STORES = {"STG", "ST"}
ATOMICS = {"ATOMG", "ATOM", "RED", "REDG"}
FP64 = {"DADD", "DFMA", "DMUL", "DSETP", "DMNMX", "DSET"}


@dataclass
class Instr:
    addr: int
    guard: Optional[str]  # "P0", "!P1", None
    opcode: str  # "LDG.E.64"
    operands: List[str]
    source: Optional[str] = None  # "loss.py:82" when line info is known

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def mods(self) -> List[str]:
        return self.opcode.split(".")[1:]

    def is_branch(self) -> bool:
        return self.base in BRANCHES

    def is_bar(self) -> bool:
        return self.base == "BAR"

    def unconditional(self) -> bool:
        return self.guard is None or self.guard == "PT"

    def access_bytes(self) -> int:
        """Bytes per thread of a memory access (from the opcode's width modifier)."""
        mods = self.mods
        for m, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if m in mods:
                return b
        return 4


@dataclass
class Block:
    index: int
    instrs: List[Instr]
    succs: List[int] = field(default_factory=list)


@dataclass
class Loop:
    header: int  # block index
    blocks: frozenset
    back_edges: List[int]  # block indices of the latches
    parent: Optional["Loop"] = None
    children: List["Loop"] = field(default_factory=list)
    source: Optional[str] = None  # source line of the back-edge branch

    @property
    def innermost(self) -> bool:
        return not self.children

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else 1 + self.parent.depth


@dataclass
class Function:
    name: str
    instrs: List[Instr]
    blocks: List[Block]
    loops: List[Loop]
    source_text: Dict[str, str] = field(default_factory=dict)  # "file:line" -> text

    def loop_instrs(self, loop: Loop) -> List[Instr]:
        return sorted((i for b in loop.blocks for i in self.blocks[b].instrs), key=lambda i: i.addr)

    def reachable_instrs(self) -> List[Instr]:
        return sorted((i for b in self.blocks for i in b.instrs), key=lambda i: i.addr)


def _split_operands(text: str) -> List[str]:
    return [t.strip() for t in text.split(",")] if text.strip() else []


def _raw_functions(text: str):
    """(name, instructions, labels, line per address) for each function in the text."""
    funcs, cur = [], None
    line = None
    for raw in text.splitlines():
        m = _FUNC.match(raw) or _NV_FUNC.match(raw)
        if m:
            cur = [m.group(1), [], {}, {}]
            funcs.append(cur)
            line = None
            continue
        if cur is None:
            continue
        m = _LINE.search(raw)
        if m:
            line = f"{m.group(1)}:{m.group(2)}"
            continue
        m = _LABEL.match(raw)
        if m:
            cur[2][m.group(1)] = len(cur[1])  # index of the next instruction
            continue
        m = _INSTR.match(raw)
        if m:
            guard = m.group(2).strip().lstrip("@") if m.group(2) else None
            cur[1].append(Instr(int(m.group(1), 16), guard, m.group(3), _split_operands(m.group(4))))
            if line is not None:
                cur[3][int(m.group(1), 16)] = line
    return funcs


def _branch_target(ins: Instr, labels: Dict[str, int], index_of: Dict[int, int]) -> Optional[int]:
    """Instruction index of a direct branch's target (None for indirect branches)."""
    for op in ins.operands:
        m = _TARGET.search(op)
        if m:
            if m.group(1):
                return index_of.get(int(m.group(1), 16))
            return labels.get(m.group(2))
    return None


def _build(name: str, instrs: List[Instr], labels: Dict[str, int]) -> Function:
    index_of = {ins.addr: k for k, ins in enumerate(instrs)}
    targets = {}
    leaders = {0}
    for k, ins in enumerate(instrs):
        if ins.is_branch():
            t = _branch_target(ins, labels, index_of)
            targets[k] = t
            if t is not None:
                leaders.add(t)
            leaders.add(k + 1)
        elif ins.base in ("EXIT", "RET", "BPT") and ins.unconditional():
            leaders.add(k + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    raw_blocks = []
    for a, b in zip(starts, starts[1:] + [len(instrs)]):
        raw_blocks.append((a, b))
    block_of = {a: n for n, (a, _) in enumerate(raw_blocks)}
    succs = []
    for a, b in raw_blocks:
        last = instrs[b - 1]
        out = []
        if last.is_branch():
            t = targets.get(b - 1)
            if t is not None:
                out.append(block_of[t])
            if not last.unconditional() and b in block_of:
                out.append(block_of[b])
        elif last.base in ("EXIT", "RET", "BPT") and last.unconditional():
            pass
        elif b in block_of:
            out.append(block_of[b])
        succs.append(out)
    # reachable blocks from the entry, renumbered in address order
    seen, stack = set(), [0] if raw_blocks else []
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(succs[n])
    keep = sorted(seen)
    renum = {old: new for new, old in enumerate(keep)}
    blocks = [Block(renum[o], instrs[raw_blocks[o][0]:raw_blocks[o][1]],
                    sorted({renum[s] for s in succs[o]})) for o in keep]
    fn = Function(name, instrs, blocks, [])
    fn.loops = _loops(blocks)
    return fn


def _dominators(blocks: List[Block]) -> List[set]:
    n = len(blocks)
    preds = [[] for _ in range(n)]
    for b in blocks:
        for s in b.succs:
            preds[s].append(b.index)
    everything = set(range(n))
    dom = [everything.copy() for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in range(1, n):
            new = set.intersection(*(dom[p] for p in preds[v])) if preds[v] else set()
            new = new | {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom


def _loops(blocks: List[Block]) -> List[Loop]:
    if not blocks:
        return []
    dom = _dominators(blocks)
    preds = [[] for _ in blocks]
    for b in blocks:
        for s in b.succs:
            preds[s].append(b.index)
    bodies: Dict[int, set] = {}
    latches: Dict[int, list] = {}
    for b in blocks:
        for h in b.succs:
            if h in dom[b.index]:  # back edge b -> h
                body, stack = {h}, [b.index]
                while stack:
                    v = stack.pop()
                    if v not in body:
                        body.add(v)
                        stack.extend(preds[v])
                bodies.setdefault(h, set()).update(body)
                latches.setdefault(h, []).append(b.index)
    loops = [Loop(h, frozenset(bodies[h]), sorted(latches[h])) for h in sorted(bodies)]
    for lp in loops:
        outer = [o for o in loops if o is not lp and lp.blocks < o.blocks]
        if outer:
            lp.parent = min(outer, key=lambda o: len(o.blocks))
            lp.parent.children.append(lp)
    return loops


def parse_sass(text: str, line_info: Optional[str] = None) -> List[Function]:
    """Functions of a ``cuobjdump -sass`` (or ``nvdisasm``) text. ``line_info``: the
    ``nvdisasm -g`` text of the same cubin, whose ``//## File`` lines name each
    instruction's source line (used to name loops and find the tile loop)."""
    lines_by_func = {}
    if line_info:
        for name, _, _, lines in _raw_functions(line_info):
            lines_by_func[name] = lines
    out = []
    for name, instrs, labels, lines in _raw_functions(text):
        lines = lines or lines_by_func.get(name, {})
        fn = _build(name, instrs, labels)
        texts = {}
        for ins in fn.instrs:
            src = lines.get(ins.addr)
            if src is not None:
                path, _, ln = src.rpartition(":")
                ins.source = f"{path.rsplit('/', 1)[-1]}:{ln}"
                if ins.source not in texts:
                    texts[ins.source] = _source_line(path, int(ln))
        fn.source_text = texts
        for lp in fn.loops:
            latch = fn.blocks[lp.back_edges[-1]].instrs[-1]
            lp.source = latch.source
        out.append(fn)
    return out


def _source_line(path: str, line: int) -> str:
    lines = _source_file(path)
    return lines[line - 1].strip() if 0 < line <= len(lines) else ""


# where a source file named by the line info is looked up when its path is gone (a cubin from
# Triton's cache, compiled in another checkout of the same sources): this checkout, site-packages
_SOURCE_ROOTS = (Path(__file__).resolve().parents[1], Path(sysconfig.get_paths()["purelib"]))


@functools.lru_cache(maxsize=64)
def _source_file(path: str) -> tuple:
    """The lines of ``path``, or of the file with the longest matching path tail under
    ``_SOURCE_ROOTS`` (empty if none)."""
    parts = Path(path).parts
    for candidate in [Path(path)] + [root.joinpath(*parts[i:]) for i in range(1, len(parts))
                                     for root in _SOURCE_ROOTS]:
        try:
            with open(candidate) as fh:
                return tuple(fh)
        except OSError:
            continue
    return ()


# ----------------------------------------------------------------------------- per-region statistics

def _regs(operand: str, width: int = 1) -> List[str]:
    """Registers an operand names: ``width`` consecutive ones for an R/UR operand (two for an
    explicit ``R4.64``, four for ``.128``), every predicate for ``PR``."""
    out = []
    for m in _REG.finditer(operand):
        r, suffix = m.group(1), m.group(2)
        if r in ("PR", "UPR"):
            out.extend(f"{'U' if r == 'UPR' else ''}P{k}" for k in range(7))
            continue
        prefix = re.match(r"UR|UP|R|P", r).group(0)
        if prefix in ("R", "UR"):
            num = int(r[len(prefix):])
            n = {".64": 2, ".128": 4}.get(suffix or "", width)
            out.extend(f"{prefix}{num + k}" for k in range(n))
        else:
            out.append(r)
    return out


_PRED = re.compile(r"U?P(T|\d+)")
_MEMORY = GLOBAL_LOADS | GLOBAL_STORES | ATOMICS | {"LDS", "STS", "LDL", "STL", "LDC", "ULDC", "ATOMS", "LDSM"}
_CONVERT = {"F2F", "I2F", "F2I", "I2I", "F2FP"}


def _widths(ins: Instr):
    """(destination width, source width, width of the last source) in 32-bit registers."""
    base, mods = ins.base, ins.mods
    if base in FP64:
        return 2, 2, 2
    if base in ("IMAD", "UIMAD") and "WIDE" in mods:
        return 2, 1, 2  # a 32 × 32 + 64-bit product
    if base in _CONVERT:
        types = [m for m in mods if re.fullmatch(r"[FSU]\d+", m)]
        dest = 2 if types and types[0].endswith("64") else 1
        src = 2 if len(types) > 1 and types[1].endswith("64") else 1
        return dest, src, src
    if base == "CS2R":
        return 2, 1, 1
    if base in _MEMORY:
        w = max(1, ins.access_bytes() // 4)
        return w, 1, (w if base in GLOBAL_STORES | {"STS", "STL", "ATOMS"} | ATOMICS else 1)
    return 1, 1, 1


def _dests_sources(ins: Instr):
    """(destination registers, source registers) of an instruction: an approximation of the
    SASS operand conventions (the first operand is the destination; *SETP/PLOP3 write their
    leading predicates; SHFL, ATOMG and LOP3 may lead with a predicate output; IADD3/LEA may
    follow the destination with a carry-out predicate; stores, branches and barriers write
    nothing). The guard predicate is a source."""
    ops = ins.operands
    n_dest = 0
    if ins.base in _NO_DEST:
        pass
    elif _SETP.match(ins.opcode):
        while n_dest < min(len(ops), 2) and _PRED.fullmatch(ops[n_dest]):
            n_dest += 1
    else:
        while n_dest < len(ops) and _PRED.fullmatch(ops[n_dest]):
            n_dest += 1  # leading predicate outputs
        n_dest += 1  # the register destination
        while (n_dest < len(ops) and _PRED.fullmatch(ops[n_dest])
               and ins.base in ("IADD3", "LEA", "IMAD", "UIADD3", "ULEA", "SHF")):
            n_dest += 1  # carry outputs
    dest_w, src_w, last_w = _widths(ins)
    dests, srcs = [], []
    for k, op in enumerate(ops):
        if k < n_dest:
            dests.extend(_regs(op, dest_w))
        else:
            srcs.extend(_regs(op, last_w if k == len(ops) - 1 else src_w))
    if ins.guard:
        srcs.append(ins.guard.lstrip("!"))
    return dests, srcs


@dataclass
class RegionStats:
    """Counts for one region, per execution (per iteration for a loop body)."""

    instructions: int = 0
    bar: int = 0
    shfl: int = 0
    mufu: int = 0
    fp64: int = 0
    global_loads: int = 0
    global_stores: int = 0
    atomics: int = 0
    membar: int = 0
    load_bytes: int = 0  # per thread
    store_bytes: int = 0  # per thread
    record_bytes: int = 0  # per thread, of those: records, partials, scalars (L2-resident), not token streams
    load_widths: List[int] = field(default_factory=list)
    load_chain: int = 0
    mem_waits: int = 0
    wait_gaps: List[int] = field(default_factory=list)  # per wait: instructions since its load issued

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("instructions", "bar", "shfl", "mufu", "fp64", "global_loads",
                                               "global_stores", "atomics", "membar", "load_bytes",
                                               "store_bytes", "load_chain", "mem_waits")}


def _record(ins: Instr, stream_sources: Optional[set]) -> bool:
    return stream_sources is not None and ins.source not in stream_sources


def region_stats(instrs: List[Instr], stream_sources: Optional[set] = None) -> RegionStats:
    """Counts and latency chains of a list of instructions executed once in address order.
    ``stream_sources``: the source lines of token-stream accesses (the tile loop's); every other
    global access counts in ``record_bytes`` (None: none does)."""
    st = RegionStats()
    depth: Dict[str, int] = {}  # register -> length of the load chain that produced it
    in_flight: Dict[str, int] = {}  # registers written by global loads not yet read -> issue index
    for ins in sorted(instrs, key=lambda i: i.addr):
        base = ins.base
        if base == "NOP":
            continue
        here = st.instructions
        st.instructions += 1
        st.bar += ins.is_bar()
        st.shfl += base == "SHFL"
        st.mufu += base == "MUFU"
        st.fp64 += base in FP64
        st.membar += base in ("MEMBAR", "FENCE")
        st.atomics += base in ATOMICS
        dests, srcs = _dests_sources(ins)
        waited = [in_flight[r] for r in srcs if r in in_flight]
        if waited:
            st.mem_waits += 1
            st.wait_gaps.append(here - max(waited))
            in_flight.clear()
        src_depth = max((depth.get(r, 0) for r in srcs), default=0)
        if base in GLOBAL_LOADS:
            st.global_loads += 1
            st.load_bytes += ins.access_bytes()
            st.record_bytes += ins.access_bytes() if _record(ins, stream_sources) else 0
            st.load_widths.append(ins.access_bytes())
            d = 1 + src_depth
            st.load_chain = max(st.load_chain, d)
            in_flight.update(dict.fromkeys(dests, here))
        elif base in GLOBAL_STORES:
            st.global_stores += 1
            st.store_bytes += ins.access_bytes()
            st.record_bytes += ins.access_bytes() if _record(ins, stream_sources) else 0
            d = src_depth
        elif base in ATOMICS and dests:  # an atomic that returns a value is a round trip too
            d = 1 + src_depth
            st.load_chain = max(st.load_chain, d)
            in_flight.update(dict.fromkeys(dests, here))
        else:
            d = src_depth
            for r in dests:
                in_flight.pop(r, None)
        for r in dests:
            depth[r] = max(d, depth.get(r, 0)) if not ins.unconditional() else d
    return st


# ----------------------------------------------------------------------------- kernel structure

@dataclass
class LoopReport:
    source: Optional[str]
    text: str
    depth: int
    innermost: bool
    stats: RegionStats


@dataclass
class KernelStructure:
    """A kernel's regions: per tile-loop iteration, per piece (the tile loop's parent, minus the
    tile loop), per work item (the outer loops' remaining code) and once per program."""

    name: str
    loops: List[LoopReport]
    tile: Optional[RegionStats]
    piece: Optional[RegionStats]
    item: Optional[RegionStats]
    once: RegionStats
    tile_source: Optional[str] = None
    levels: int = 0  # loops from the tile loop out (1: the tile loop alone; 2: + the item loop; 3+: pieces)
    last: Optional[RegionStats] = None  # after the completion ticket: run by the last program alone

    def innermost(self) -> List[LoopReport]:
        return [lp for lp in self.loops if lp.innermost]


TILE_LOOP = r"BLOCK_T"  # the loss kernels' token-tile loops: ``for t0 in range(..., BLOCK_T)``


def _is_tile_loop(fn: Function, lp: Loop, tile_pattern: str) -> bool:
    """The loop's back-edge, or else any of its instructions (ptxas may schedule another line's
    instruction last), comes from a source line matching ``tile_pattern``."""
    sources = [lp.source] + [i.source for i in fn.loop_instrs(lp)]
    return any(re.search(tile_pattern, fn.source_text.get(src, "")) for src in sources if src)


def _split_at_ticket(once: List[Instr]) -> tuple:
    """(every program's part, the last program's part) of the once region: the code after the first
    atomic that returns a value (the completion ticket) runs in the program that drew the last ticket."""
    ticket = min((i.addr for i in once if i.base in ATOMICS and _dests_sources(i)[0]), default=None)
    if ticket is None:
        return once, None
    return [i for i in once if i.addr <= ticket], region_stats([i for i in once if i.addr > ticket])


def kernel_structure(fn: Function, tile_pattern: str = TILE_LOOP, last_program: bool = False) -> KernelStructure:
    """Split ``fn`` into regions; the tile loop is the innermost loop whose back-edge source line
    matches the regular expression ``tile_pattern``. ``last_program``: the kernel ends with a
    completion ticket (one atomic per program) whose last holder alone runs the rest."""
    reports = []
    for lp in fn.loops:
        reports.append(LoopReport(lp.source, fn.source_text.get(lp.source or "", ""), lp.depth, lp.innermost,
                                  region_stats(fn.loop_instrs(lp))))
    inner = [lp for lp in fn.loops if lp.innermost]
    tiles = [lp for lp in inner if _is_tile_loop(fn, lp, tile_pattern)]
    if not fn.source_text and inner:  # no line info: the innermost loop moving the most bytes
        best = max(inner, key=lambda lp: (region_stats(fn.loop_instrs(lp)).bytes, len(lp.blocks)))
        tiles = [best] if region_stats(fn.loop_instrs(best)).bytes > 0 else []
    everything = fn.reachable_instrs()
    if not tiles:
        once, last = _split_at_ticket(everything) if last_program else (everything, None)
        return KernelStructure(fn.name, reports, None, None, None, region_stats(once), last=last)
    # several tile loops (alternative paths): cost the heaviest one
    tile = max(tiles, key=lambda lp: region_stats(fn.loop_instrs(lp)).instructions)
    chain = [tile]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    tile_blocks = set(tile.blocks)
    piece_blocks = set(chain[1].blocks) - tile_blocks if len(chain) > 1 else set()
    outer_blocks = set(chain[-1].blocks) - tile_blocks - piece_blocks if len(chain) > 2 else set()
    in_loops = set(chain[-1].blocks)

    def instrs_of(blocks):
        return [i for b in sorted(blocks) for i in fn.blocks[b].instrs]

    # token streams: the tile loop's access lines (a piece's prologue loads its first tile with them)
    streams = ({i.source for i in instrs_of(tile_blocks) if i.base in GLOBAL_LOADS | GLOBAL_STORES}
               if fn.source_text else None)
    once = [i for b in fn.blocks if b.index not in in_loops for i in b.instrs]
    once, last = _split_at_ticket(once) if last_program else (once, None)
    return KernelStructure(fn.name, reports, region_stats(instrs_of(tile_blocks)),
                           region_stats(instrs_of(piece_blocks), streams) if piece_blocks else RegionStats(),
                           region_stats(instrs_of(outer_blocks), streams) if outer_blocks else RegionStats(),
                           region_stats(once), tile.source, len(chain), last)


def bars_in_innermost_loops(fn: Function) -> List[tuple]:
    """(loop source, BAR count) for every innermost loop with a ``BAR.*`` in its body."""
    out = []
    for lp in fn.loops:
        if lp.innermost:
            n = sum(i.is_bar() for i in fn.loop_instrs(lp))
            if n:
                out.append((lp.source, n))
    return out


# ----------------------------------------------------------------------------- occupancy

REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
SMEM_ALLOC_UNIT = 128


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Resident CTAs per H100 SM (the CUDA occupancy calculator's rule for sm_90):
    registers per warp = ceil(regs × 32 / 256) × 256; warps that fit the 65,536-register file =
    floor(65536 / that); CTAs by registers = floor(those warps / warps per CTA); also at most
    2048 threads, 32 CTAs and 228 KiB of shared memory (+1 KiB reserved per CTA, 128 B units)."""
    per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    smem = math.ceil((max(shared_bytes, 0) + SMEM_RESERVED_PER_CTA) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = SMEM_PER_SM // smem
    return max(0, min(MAX_CTAS_PER_SM, by_regs, by_threads, by_smem))


# ----------------------------------------------------------------------------- the H100 model

@dataclass(frozen=True)
class H100Model:
    """Constants of the modelled H100 SXM5 (assumptions, not measurements)."""

    sms: int = 132
    clock_hz: float = 1.755e9
    hbm_bytes_per_s: float = 3.35e12
    hbm_efficiency: float = 0.9  # what streaming kernels (a device copy) reach of the datasheet figure
    schedulers_per_sm: int = 4  # one instruction per scheduler per cycle, in order
    warp_cpi: float = 2.0  # cycles per instruction of one warp alone (4-cycle ALU latency, ILP ~2)
    dram_latency_cycles: int = 800  # a loaded DRAM round trip under load (~455 ns)
    l2_latency_cycles: int = 260  # an L2 hit (records, partials, scalars)
    bar_round_trip_cycles: int = 100  # one BAR.SYNC with its shuffle tree and shared-memory exchange
    sm_max_bytes_per_cycle: float = 64.0  # L2 -> SM fabric, per SM
    mufu_lanes_per_sm: int = 16  # MUFU results per cycle per SM
    shfl_lanes_per_sm: int = 32
    fp64_lanes_per_sm: int = 64
    launch_s: float = 4e-6  # per kernel launch (SPEC §13 roofline convention)
    sync_s: float = 20e-6  # eager code: one host sync (.item()) drains the stream: round trip + restart

    @property
    def achievable_bytes_per_s(self) -> float:
        return self.hbm_bytes_per_s * self.hbm_efficiency


H100 = H100Model()


def assumptions_text(m: H100Model = H100) -> str:
    return "\n".join([
        "MODEL, not a measurement. Modelled GPU: H100 SXM5, "
        f"{m.sms} SMs at {m.clock_hz / 1e9:.3f} GHz, HBM {m.hbm_bytes_per_s / 1e12:.2f} TB/s of which "
        f"{m.hbm_efficiency:.0%} ({m.achievable_bytes_per_s / 1e12:.2f} TB/s) is achievable by any kernel.",
        f"- launch overhead {m.launch_s * 1e6:.0f} µs per kernel (fused Triton launches and aten ops alike);",
        f"- DRAM round trip {m.dram_latency_cycles} cycles ({m.dram_latency_cycles / m.clock_hz * 1e9:.0f} ns) "
        f"for the token streams of a tile loop; L2 round trip {m.l2_latency_cycles} cycles "
        f"({m.l2_latency_cycles / m.clock_hz * 1e9:.0f} ns) for everything else (records, partials, scalars);",
        f"- each BAR.* costs a round trip of {m.bar_round_trip_cycles} cycles (its shuffle tree, the shared-memory "
        "exchange and the wait for every warp of the CTA), in series with the rest of the iteration;",
        f"- in-order issue: {m.schedulers_per_sm} schedulers per SM, one instruction per cycle each; one warp alone "
        f"issues one instruction every {m.warp_cpi:g} cycles (dependent ALU latency); MUFU {m.mufu_lanes_per_sm}, "
        f"SHFL {m.shfl_lanes_per_sm}, FP64 {m.fp64_lanes_per_sm} lanes per cycle per SM;",
        "- the code after a completion ticket (the loss kernel's finalize) runs once per launch, in the last "
        "program alone, after the others (one CTA on its SM, partials read from L2);",
        "- the code outside the loops (once per program), and the accesses of the item and piece regions "
        "from source lines the tile loop does not use, move records, partials and scalars, L2-resident: "
        f"at the L2→SM rate ({m.sm_max_bytes_per_cycle:g} B/cycle), every thread's access counted;",
        "- every instruction of a loop body issues once per iteration (both sides of an if: an upper bound); "
        "loops other than the tile loop and its parents run once; the chunked kernels' piece loop runs once "
        "per row boundary in a chunk;",
        "- memory: per iteration a CTA waits mem_waits round trips (in-order issue: the first use of a load in "
        "flight waits for it, less the cycles its warp issued since the load, and the loads then in flight "
        "arrive with it); per-SM bandwidth = min(bytes in "
        "flight / latency "
        f"(Little's law, from the iteration time), {m.sm_max_bytes_per_cycle:g} B/cycle L2→SM, achievable HBM / "
        "active SMs); predicated-off accesses move nothing, so a chunked kernel's tile and piece regions are "
        "charged their chunk's token bytes (a piece's loads run one tile ahead; its last tile is partial);",
        "- per SM: CTAs resident = min(CTAs/SM from registers and threads, CTAs assigned); a region's time = "
        "max(one CTA's latency path, issue of all resident CTAs, pipe limits, bytes / per-SM bandwidth); "
        "the slowest SM (ceil(grid / 132) CTAs, each with ceil(work items / grid) items) sets the launch time;",
        f"- registers → CTAs/SM: ceil(regs × 32 / {REG_ALLOC_UNIT}) × {REG_ALLOC_UNIT} registers per warp, "
        f"floor({REGS_PER_SM} / that) warps, floor(warps / warps per CTA) CTAs, ≤ {MAX_THREADS_PER_SM} threads, "
        f"≤ {MAX_CTAS_PER_SM} CTAs, ≤ {SMEM_PER_SM // 1024} KiB shared memory;",
        "- eager PyTorch (launches, syncs and bytes per token of bench/eager.py counted on the CPU at one "
        f"shape, bytes scaled by tokens): every aten launch costs its bytes / "
        f"{m.achievable_bytes_per_s / 1e12:.2f} TB/s + {m.launch_s * 1e6:.0f} µs; the high end adds "
        f"{m.sync_s * 1e6:.0f} µs per host sync;",
        f"- roofline (SPEC §13): traffic-model bytes / {m.hbm_bytes_per_s / 1e12:.2f} TB/s + "
        f"{m.launch_s * 1e6:.0f} µs × launches.",
    ])


@dataclass
class Work:
    """How many tile iterations the slowest program of one launch runs."""

    items_per_program: int  # work items (rows, chunks) of the busiest program
    pieces_per_item: float  # executions of the tile loop's parent body per item (1 without a piece loop)
    tiles_per_item: float  # tile-loop iterations per item
    moved: float = 1.0  # share of the loop nest's issued token bytes that move (predicated-off loads move none)


@dataclass
class LaunchCost:
    kernel: str
    grid: int
    ctas_per_sm: int
    resident: int
    waves: int
    seconds: float
    bound: str  # "region:term" of the largest contribution, e.g. "tile:latency"

    detail: dict


def _region_cycles(st: RegionStats, m: H100Model, warps: int, resident: int, latency: int,
                   bw_per_cycle: float, moved: float = 1.0) -> tuple:
    """(cycles, bound, every term) of one execution of a region by ``resident`` co-resident CTAs;
    ``moved``: the share of its access bytes that move data."""
    threads = 32 * warps
    cpi = max(m.warp_cpi, warps / m.schedulers_per_sm)
    gaps = st.wait_gaps + [0] * (st.mem_waits - len(st.wait_gaps))
    waits = sum(max(0.0, latency - gap * cpi) for gap in gaps)  # what is left of each round trip
    lat = waits + st.bar * m.bar_round_trip_cycles + st.instructions * cpi
    issue = resident * warps * st.instructions / m.schedulers_per_sm
    pipes = resident * threads * max(st.mufu / m.mufu_lanes_per_sm, st.shfl / m.shfl_lanes_per_sm,
                                     st.fp64 / m.fp64_lanes_per_sm)
    # token streams at the region's bandwidth (``moved``: the share that moves), records at L2→SM's
    records = st.record_bytes / m.sm_max_bytes_per_cycle
    mem = resident * threads * ((st.bytes - st.record_bytes) * moved / bw_per_cycle + records)
    terms = {"latency": lat, "issue": issue, "pipes": pipes, "memory": mem}
    bound = max(terms, key=terms.get)
    return terms[bound], bound, terms


def launch_time(kernel: KernelStructure, registers: int, num_warps: int, shared_bytes: int, grid: int,
                work: Optional[Work], m: H100Model = H100) -> LaunchCost:
    """Modelled time of one launch (see :func:`assumptions_text`)."""
    occ = ctas_per_sm(registers, num_warps, shared_bytes)
    grid = max(1, grid)
    per_sm = math.ceil(grid / m.sms)  # CTAs on the busiest SM
    resident = max(1, min(occ, per_sm))
    waves = math.ceil(per_sm / resident)
    active = min(grid, m.sms)
    bw = min(m.sm_max_bytes_per_cycle, m.achievable_bytes_per_s / active / m.clock_hz)  # bytes/cycle per SM
    # the once region moves records, partials and scalars: L2-resident, at the L2→SM rate
    regions = [("once", kernel.once, 1, m.l2_latency_cycles, 1.0, m.sm_max_bytes_per_cycle)]
    if kernel.tile is not None:
        work = work or Work(1, 1.0, 1.0)  # unknown work: one pass through the loop nest
        pieces = work.items_per_program * work.pieces_per_item
        regions += [("item", kernel.item, work.items_per_program, m.l2_latency_cycles, 1.0, bw),
                    ("piece", kernel.piece, pieces, m.l2_latency_cycles, work.moved, bw),
                    ("tile", kernel.tile, work.items_per_program * work.tiles_per_item, m.dram_latency_cycles,
                     work.moved, bw)]
    wave_cycles, detail, bounds = 0.0, {}, {}
    for name, st, count, latency, moved, region_bw in regions:
        c, bound, terms = _region_cycles(st, m, num_warps, resident, latency, region_bw, moved)
        wave_cycles += count * c
        bounds[name] = (count * c, bound)
        detail[name] = {"executions": count, "cycles_each": c, "bound": bound, **terms}
    total = waves * wave_cycles
    if kernel.last is not None:  # one CTA, after every other program, reading their partials from L2
        c, bound, terms = _region_cycles(kernel.last, m, num_warps, 1, m.l2_latency_cycles, m.sm_max_bytes_per_cycle)
        total += c
        bounds["last"] = (c, bound)
        detail["last"] = {"executions": 1, "cycles_each": c, "bound": bound, **terms}
    main = max(bounds, key=lambda k: bounds[k][0])
    detail.update(ctas_per_sm=occ, resident=resident, waves=waves, active_sms=active, sm_bytes_per_cycle=bw)
    return LaunchCost(kernel.name, grid, occ, resident, waves, total / m.clock_hz + m.launch_s,
                      f"{main}:{bounds[main][1]}", detail)
