"""The synthetic fine-grained text-video benchmark (docs/SYNTHETIC.md), one module per responsibility.

Modules (nothing is imported here, so ``import synthetic.groups`` loads only that torch-free module):

* ``synthetic.world``: the attributes, the caption grammar, the plan of scenes and groups;
* ``synthetic.render``: the frames and the h264 mp4 of a scene;
* ``synthetic.manifest``: the dataset builder (the registry's ``"synthetic.manifest:build"``);
* ``synthetic.pretrain``: the world's small CLIP, pretrained on train-split frame captions;
* ``synthetic.probes``: linear probes of an encoder on the world (the calibration);
* ``synthetic.groups``: within-group accuracy from scores or ranked lists (torch-free);
* ``synthetic.head_groups``: within-group accuracy of stage one and stage-two heads on a split.
"""
