"""The convs a ResNet runs, read from its jaxpr: the taps counted inside the input."""

from bigjax.models import conv_shapes


def test_valid_taps_count_the_kernel_positions_inside_the_input():
    for n_in, k, stride, pad in [(67, 7, 2, 3), (5, 3, 1, 1), (8, 3, 2, 1), (2, 3, 2, 1), (9, 1, 2, 0)]:
        n_out = (n_in + 2 * pad - k) // stride + 1
        brute = sum(0 <= o * stride + j - pad < n_in for o in range(n_out) for j in range(k))
        assert conv_shapes._valid_taps(n_in, n_out, k, stride, 1, pad) == brute


def test_resnet18_runs_twenty_convs_the_first_on_the_image():
    convs = conv_shapes.conv_shapes("resnet18", 64)
    assert len(convs) == 20  # stem, 16 in the blocks, 3 downsampling shortcuts
    assert convs[0][:3] == ((1, 64, 64, 3), (1, 32, 32, 64), (7, 7, 3, 64))
    assert convs[-1][1] == (1, 2, 2, 512)
