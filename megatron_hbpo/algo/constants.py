"""The HBPO paper's settings (docs/method.md), defined once.

The recipe's defaults (config.py), the algorithm functions' keyword defaults and the tools' flag
defaults all read these; none of them repeats a number. Torch-free, like the rest of what config
imports.
"""

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
