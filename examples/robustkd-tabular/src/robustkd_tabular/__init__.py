"""robustkd-tabular: an example robustkd plug-in (a tabular task, an MLP, a random-search attack)."""
from .attacks import RandomSearch
from .tasks import TabularTask, tabular_blobs, tabular_csv, tabular_mlp

__all__ = ["RandomSearch", "TabularTask", "tabular_blobs", "tabular_csv", "tabular_mlp"]
