"""Transfer evaluation: does pre-training on the NDS selection help a target task?

tasks (the targets), strategies (what each strategy pre-trains on), training (the CNN recipe),
runner (the loop), outputs (tables, plot, warehouse rows), fit (accuracy vs log budget),
request (the flow's parameters).
"""
