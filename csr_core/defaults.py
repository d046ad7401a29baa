"""The CSR cache's defaults, in one place for both runtimes (pure Python: `mlx_backend` imports it without torch).

Chosen on the validation split (BENCHMARKS.md "Ablation"): no online or guard atoms (steps 10, 10b: with the
N = 2048 dictionary their bits buy more as code atoms, at 1 and at 2 bits; the paper's online/guard design stays a
setting, e.g. `guard_atoms=256, guard_threshold=0.1` where retrieval matters), the first 4 tokens exact
(attention sinks), the worst-coded quarter of the vectors refined by 4 more atoms (step 12,
`configs/ablation-refine*.yaml`: at the same total bits −1.7 points at 2 bits, −2.8 at 1 bit; a budget covers it),
5-bit e3m1 coefficients (`configs/ablation-coefficients.yaml`: at the same bits they buy more atoms than fp8) with
indices at the bits the row dictionary needs.
"""

ONLINE_ATOMS = 0  # per layer, kind and batch row: the prompt's own vectors (reverse sequential sampling)
GUARD_ATOMS = 0  # per layer, kind and batch row: outliers stored as their own atom
GUARD_THRESHOLD = 0.3  # relative residual ‖x − x̂‖² / ‖x‖² above which a vector becomes a guard atom
SINK_TOKENS = 4  # first tokens of each row kept exact
WINDOW = 0  # newest tokens kept exact
REFINE_FRACTION = 0.25  # share of each coding call's vectors (per row) that get refine_atoms more atoms: the worst coded
REFINE_ATOMS = 4  # atoms each refined vector gets on top of its code (MP continued on its residual)
CODING_BATCH = 8  # new tokens are coded once this many have gathered (exact, and counted, until then)
COEF_FORMAT = "e3m1"  # "e3m1" (5 bits) | "fp8" (E4M3) | "int8" | "fp16"
INDEX_BITS = None  # None: ⌈log2(offline + online + guard atoms)⌉; 16 with "fp16" is the paper's layout
KEY_WEIGHT = 1.0  # allocation: exchange rate of key error against value error (csr_core/allocation.py)
