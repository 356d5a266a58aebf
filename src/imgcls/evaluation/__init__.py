"""Evaluation, numbers only (the figures of them are in imgcls.reports).

    metrics.py       accuracy, top-k, per-class precision/recall/F1, confusion matrix, the eval files
    evaluate.py      a model scored on a split; predictions.py a run's own splits and their logits
    calibration.py   temperature scaling; thresholds.py one threshold per class
    probes.py        linear probes of every convolutional stage
    cv.py            stratified folds, each fold's dataset, the summary, and the cv folder's files
    multilabel.py    several labels per image: mAP, micro/macro F1, exact-set accuracy, Hamming loss, co-occurrence
"""
