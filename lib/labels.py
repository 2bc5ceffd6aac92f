"""Label conventions shared by the data path and the loss."""

# The label of a token that is not trained (a prompt, padding, a segment's last token): PyTorch's
# cross_entropy default ignore_index and the convention of HF datasets.
IGNORE_INDEX = -100
