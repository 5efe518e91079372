from torch.ao import pruning as ref

import prunekit


def test_mappings_equal_the_reference():
    assert (
        prunekit.get_static_sparse_quantized_mapping() == ref.get_static_sparse_quantized_mapping()
    )
    assert (
        prunekit.get_dynamic_sparse_quantized_mapping()
        == ref.get_dynamic_sparse_quantized_mapping()
    )


def test_reference_names_are_all_exported():
    public = [name for name in dir(ref) if not name.startswith("_") and name[0].isalpha()]
    public = [name for name in public if callable(getattr(ref, name))]
    missing = [name for name in public if not hasattr(prunekit, name)]
    assert missing == []
