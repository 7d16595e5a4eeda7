"""The testbed: a zoo of small domain experts trained here, and merge-and-evaluate labels.

No weights or data sets can be downloaded, so the project grows its own ground truth: a tiny
causal LM pretrained from scratch on text that ships with Python, experts fine-tuned from it on
five domains, and every 2-, 3- and 4-way merge of them evaluated for real.
"""
