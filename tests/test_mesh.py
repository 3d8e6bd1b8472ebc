import jax
import pytest

import shardinfer as si


def test_default_mesh_puts_every_device_on_data():
    mesh = si.make_mesh()
    assert dict(mesh.shape) == {"data": 8}


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("data=2,model=4", {"data": 2, "model": 4}),
        ({"data": 4, "model": 2}, {"data": 4, "model": 2}),
        ("data=-1,model=2", {"data": 4, "model": 2}),
        (" model = 8 ", {"model": 8}),
    ],
)
def test_specs(spec, shape):
    assert dict(si.make_mesh(spec).shape) == shape


def test_device_subset():
    mesh = si.make_mesh("model=4", devices=jax.devices()[4:])
    assert dict(mesh.shape) == {"model": 4}
    assert {d.id for d in mesh.devices.flat} == {4, 5, 6, 7}


def test_mesh_matches_jax_make_mesh_order():
    ours = si.make_mesh("data=2,model=4")
    theirs = jax.make_mesh((2, 4), ("data", "model"))
    assert [d.id for d in ours.devices.flat] == [d.id for d in theirs.devices.flat]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=3,model=4", r"multiply to 12, but there are 8 devices"),
        ("data=-1,model=-1", "only one mesh axis may be -1"),
        ("data=-1,model=3", "8 devices do not divide by 3"),
        ("data", "must look like name=size"),
        ("data=two", "non-integer size"),
        ("data=0", "sizes are >= 1"),
        ("data=2,data=4", "appears twice"),
        (42, "a mesh spec is a string"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        si.make_mesh(spec)
