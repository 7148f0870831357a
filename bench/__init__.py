"""Benchmarks, real peers and test-guest tooling for vhostx.

The top layer: it may import everything below (``vhostx``, ``iosched``, ``virtio``) and nothing imports
it except tests and scripts (the `vhostx` command finds `bench` and `demo` through the
``vhostx.commands`` entry points, bench.cli:register and bench.demo:register). ``bench.guest`` builds the test guest's kernel and initramfs in a cache
directory outside the repository; ``bench.qemu`` starts QEMU guests with vhost-user NICs and reads
their serial console. Any thread may use these modules; none of them runs on the daemon's data path.
"""
