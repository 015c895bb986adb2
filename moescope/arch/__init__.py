"""Architecture: the normalised MoE description of a checkpoint (moe), tensor inventories and their
classification (inventory, tensorclasses), inventories from a config alone (closedform), config
validation (validate) and moescope's generic spec files (specfile).

The package imports nothing itself: import the module you need (``import moescope`` stays cheap).
"""
