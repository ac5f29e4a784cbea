"""The HBPO paper's settings (docs/method.md) and the baselines' (docs/baselines.md), defined once.

The recipe's defaults (config.py), the algorithm functions' keyword defaults and the tools' flag
defaults all read these; none of them repeats a number. Torch-free, like the rest of what config
imports.
"""

from typing import Final

# Hierarchical budget exploration: k = 4 subgroups and the sentence that states a budget.
BUDGETS = (512, 1024, 2048, 2560)
BUDGET_TEMPLATE = " I will answer the question within {budget} tokens"
EFFICIENCY_SENTENCE = " I will answer the question with minimal tokens"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# DeepScaleR's user turn; `{problem}` is the only placeholder (other braces are literal).
PROMPT_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."

# The budget-aware reward: L_max, f1's deviation penalty and the cosine's height.
L_MAX = 4096
ALPHA = 1.0 / 4096
BETA = 4.0

# The advantage's epsilon and the policy loss's clip range and dual clip.
ADV_EPS = 1e-6
CLIP_EPS_LOW = 0.2
CLIP_EPS_HIGH = 0.28
DUAL_CLIP_C = 3.0

# -- The baselines' authors' settings (docs/baselines.md, "Settings"), read by algo/l1.py, tlmre.py,
# adaptthink.py and by the recipe's defaults (config.py: algo.l1, algo.tlmre, algo.adaptthink).
# L1 / LCPO: exact-mode slope, max-mode slope and offset, target range, stage, L1-Max's share of max prompts.
L1_ALPHA = 0.0003
L1_ALPHA_MAX = 0.001
L1_DELTA = 0.5
L1_N_MIN = 100
L1_N_MAX = 4000
L1_STAGE: Final = "exact"  # Final: the recipe field's Literal type
L1_MAX_FRACTION = 0.5
L1_EVAL_TARGETS = (512, 1024, 2048, 3600)
# TLMRE: the length push, the std's epsilon, batch whitening (the released code's; the paper has none).
TLMRE_ALPHA = 0.1
TLMRE_STD_EPS = 1e-7
TLMRE_BATCH_WHITEN = False
# AdaptThink: the NoThinking bonus, clip range, forced split, R_ref samples, NoThinking cap, forced tokens.
ADAPTTHINK_DELTA = 0.05
ADAPTTHINK_CLIP_EPS = 0.2
ADAPTTHINK_NOTHINKING_FRACTION = 0.5
ADAPTTHINK_REF_SAMPLES = 16
ADAPTTHINK_NOTHINKING_MAX_RESPONSE_LENGTH = 4096
ADAPTTHINK_NOTHINKING_TOKEN = "</think>"
ADAPTTHINK_THINKING_TOKEN = "Alright"
# Budget adherence: L1's soft-violation margin in tokens (docs/baselines.md, "Budget adherence").
ADHERENCE_SOFT_MARGIN = 500

# -- AnytimeReasoner / BRPO (docs/anytime.md): the released 1.5B/8k script's settings, read by algo/anytime.py and
# the recipe's algo.anytime defaults.
ANYTIME_THINKING_BUDGET = 8000
ANYTIME_N_BUDGETS = 4
ANYTIME_N_SUMMARIES = 4
ANYTIME_SUMMARY_MAX_TOKENS = 118
ANYTIME_LAM = 0.5
ANYTIME_LOSS_NORMALIZER = 10176
ANYTIME_CLIP_EPS = 0.2
# Room per summary for its inserted tokens in the row-length check: 3 + 5 for the R1-Distill tokenizer.
ANYTIME_INSERT_ALLOWANCE = 8
# The named configurations of docs/anytime.md ("Named configurations"), as algo.anytime field values.
ANYTIME_PRESET_FIELDS = ("n_summaries", "summary_method", "n_budgets", "prior", "variance_reduction")
ANYTIME_PRESETS: dict[str, dict] = {
    name: dict(zip(ANYTIME_PRESET_FIELDS, row, strict=True))
    for name, row in {
        "grpo": (1, "grpo", 1, "base", "v2only"),
        "base": (4, "brpo", 4, "base", "brpo"),
        "linear": (4, "brpo", 4, "linear", "brpo"),
        "uniform": (4, "brpo", 4, "uniform", "brpo"),
        "grpo_linear": (1, "grpo", 4, "linear", "v2only"),
        "grpo_decouple": (4, "brpo", 4, "base", "v2only"),
        "grpo_vr": (1, "grpo", 4, "base", "brpo"),
    }.items()
}
