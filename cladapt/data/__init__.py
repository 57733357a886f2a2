"""Training and evaluation rows: reading files, folders and datasets, validating them, image rows.

Below ``train``, ``evaluation`` and ``serve``: everything that turns a user's data into checked
:class:`~cladapt.data.rows.Example` rows lives here, so scoring a held-out file and training on it
read rows the same way.
"""
