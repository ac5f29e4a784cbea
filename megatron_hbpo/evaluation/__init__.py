"""Evaluation metrics that are pure functions of scored responses (no model, no torch).

adherence   how closely response lengths follow the budget or target length they were asked for
"""
