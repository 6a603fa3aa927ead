"""A user task for ``gradnoise study``: breast-cancer diagnosis (scikit-learn's bundled
data set, 569 samples, 30 features, no download) with a small MLP.

    gradnoise study --task examples/my_task.py:task          # a file path, or
    gradnoise study --task my_task:task                      # a module on sys.path / cwd

The protocol: a function with no required arguments returning
``(model, dataset, loss_fn)`` — a freshly initialised ``nn.Module``, the samples as
``(x, y)`` tensors or a map-style Dataset of ``(input, target)`` pairs, and a
mean-reduced loss ``loss_fn(output, target)``. gradnoise seeds torch before calling it.

With two classes, the online study (one class group per phase, five phases) and the
federated one (ten clients under Dirichlet(0.1) label skew) do not apply: they are
skipped with a note, and the command still exits 0.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import TensorDataset


def task():
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)                      # standardised features
    y = torch.tensor(data.target, dtype=torch.int64)    # 0 malignant, 1 benign
    model = nn.Sequential(nn.Linear(30, 32), nn.Tanh(), nn.Linear(32, 2))
    return model, TensorDataset(x, y), F.cross_entropy
