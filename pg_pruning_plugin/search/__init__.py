"""The method of docs/method.md: the search configuration and result, the policy (estimators and
sampling), the budget, the initial probabilities and the loop."""
