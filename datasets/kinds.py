"""The raw formats ``nps convert`` reads (its KIND argument): listed here, apart from the readers, so the CLI can
offer them without importing numpy or a reader."""

KINDS = ("idx", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "npz")
