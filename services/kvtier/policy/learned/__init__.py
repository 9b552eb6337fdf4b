"""The learned policy: a temporal importance predictor trained online, and the reuse densities
that rank and admit pages.

    features.py   per-block access history and the feature vector
    predictor.py  the MLP that predicts each block's time to next access (AdamW, online)
    density.py    reuse density per class of blocks (hit density, LHD-style)
    model.py      LearnedModel (features + predictor + labels) and the simulator's core
    policy.py     LearnedPolicy: the same model behind the store's Policy interface
"""
