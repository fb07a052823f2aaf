"""The Keras-style API of pstrain.

Usage::

    from client import nn
    model = nn.Sequential([
        nn.Dense(256, activation="relu", input_dim=784),
        nn.Dense(10, activation="softmax"),
    ])
    model.compile(nn.optimizers.SGD(learning_rate=0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=128, epochs=5)
"""
from client.nn import activations, losses, optimizers, regularizers
from client.nn.layers import Activation, BatchNormalization, Dense, Dropout, Flatten, Layer
from client.nn.model import History, Sequential, load_model

__all__ = [
    "Sequential", "Dense", "Dropout", "BatchNormalization", "Flatten", "Activation", "Layer",
    "History", "load_model", "activations", "losses", "optimizers", "regularizers",
]
