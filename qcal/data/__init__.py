"""Load stage, data: image sources, preprocessing, which images are used, and the batch cache.

==================  ==========================================================================
module              what it holds
==================  ==========================================================================
``sources``         fixed, ordered collections of labelled images (folders, RecordIO, IDX)
``preprocessing``   how an encoded image becomes the float32 C x H x W a model takes
``plan``            the evaluated and calibration images of one model, never overlapping
``class_folders``   which label each class folder stands for (any names, synset ids, labels.txt)
``cache``           preprocessed batches on disk, decoded once per sweep
``fashion_mnist``   the embedded default's data (IDX files vendored under ``data/``)
``imagenet_classes``  the 1000 ImageNet-1k classes in the standard index order
==================  ==========================================================================
"""
