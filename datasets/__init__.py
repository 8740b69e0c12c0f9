"""nps.datasets: raw datasets -> FFCV .beton files -> train/val loaders.

Modules (import the one you need; this package imports nothing heavy by itself):

* :mod:`~nps.datasets.sources`, :mod:`~nps.datasets.imagefolder` -- strict readers of IDX, CIFAR pickles, .npz and
  ImageFolder trees;
* :mod:`~nps.datasets.convert` -- ``convert_dataset`` / ``verify_dataset`` (the ``nps convert`` command);
* :mod:`~nps.datasets.betonfile` -- reading .beton files back without decoding, the content fingerprint;
* :mod:`~nps.datasets.meta` -- ``meta.json``;
* :mod:`~nps.datasets.loaders` -- ``make_loaders``: FFCV or on-device (:mod:`~nps.datasets.device_loader`) loaders,
  finishing each batch on the device (:mod:`~nps.datasets.batch_ops`);
* :mod:`~nps.datasets.errors` -- ``DatasetError``, the one-line bad-input error.
"""
