"""Training: the loop and what it is made of (the sequence of a whole run is imgcls.driver).

    trainer.py       fit: prepare, train_one_epoch, validate, checkpoints, the test split; stage 1 (fit_head)
    strategy.py      the one seam for data parallelism: OneProcess, the interface the trainer calls
    distributed.py   DataParallel over torch.distributed (gloo, NCCL); launch.py starts N processes
    optim.py         optimisers, LR schedules, early stopping, class weights
    losses.py        the loss: softmax cross-entropy, or a sigmoid and binary cross-entropy per label
    transfer.py      frozen-backbone features and the classifier fitted on them
    callbacks.py     the hooks trackers and callers attach; progress.py the progress bar
"""
