"""The HBPO algorithm as pure functions on tensors (docs/method.md); no distributed state.

budgets   subgroup assignment and the budget prefix of the prompt
reward    budget-aware piecewise reward, GRPO's 0/1 reward
verify    answer extraction and math-verify in a watchdog process pool
advantage hierarchical (inter + intra budget) advantage, GRPO's group-normalised advantage
loss      clipped surrogate with dual clip, summed for a global token-mean
anytime   AnytimeReasoner / BRPO: budget cuts, forced-summary prompts, summary rewards, both advantages
l1        baseline L1 (LCPO): length sentences, target draws, L1-Exact / L1-Max rewards
tlmre     baseline TLMRE: length-normalised reward among correct answers, leave-one-out advantage
adaptthink baseline AdaptThink: forced Thinking/NoThinking first token, R_ref advantage, sequence-ratio loss

Kept free of imports so that the verifier's worker processes start without torch.
"""
