"""Data: every dataset as uint8 images in seeded splits, from a built-in set, a folder or a zip.

    registry.py   build_dataset: the built-in datasets (one entry each) and own folders or zips; seeded splits
    base.py       ImageDataset and Split, the one shape of every dataset
    official.py   MNIST and CIFAR-10 from their official archives; download.py fetches and checks them
    sources.py    folders and zips read alike, with their limits (members, bytes, links)
    layout.py     class folders, or train/ + test/ splits, found in a source; clear refusals otherwise
    multilabel.py a CSV of several labels per image (found beside the images, or --labels), iterative splits
    decode.py     decoding many images at once (workers), images.py one guarded image at a time
    folder.py     an own folder or zip to an ImageDataset; cache.py its decoded images, checksummed
    inputs.py     what predict and explain take: paths, folders, zips, PIL images, arrays
    augment.py    training augmentation on batches of tensors
"""
