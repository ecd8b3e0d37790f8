// A PyTorch C++ extension that puts tensors in meshmem pool memory.
//
// alloc_on(pool, node, shape) allocates a float32 tensor whose pages live on
// `node` and wraps it with torch::from_blob. The tensor's deleter frees the
// allocation, so the memory returns to the pool when the last reference to
// the tensor goes. view_at(pool, addr, shape) wraps memory another node
// allocated, without a copy and without taking ownership.
//
// `pool` is the handle of a pool joined from Python (meshmem.Pool.handle) or
// C: the extension links the same libmeshmem that Python loaded, so both
// see the same handles.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "meshmem.h"

namespace {

void check(meshmem_status status, const char *call) {
    TORCH_CHECK(status == MESHMEM_OK, call, " failed: ", meshmem_last_error_message());
}

size_t float_bytes(const std::vector<int64_t> &shape) {
    uint64_t count = 1;
    for (int64_t size : shape) {
        TORCH_CHECK(size >= 0, "shape has the negative size ", size);
        TORCH_CHECK(size == 0 || count <= UINT64_MAX / 4 / static_cast<uint64_t>(size),
                    "shape's byte size overflows 64 bits");
        count *= static_cast<uint64_t>(size);
    }
    return static_cast<size_t>(count * sizeof(float));
}

torch::Tensor alloc_on(uint64_t handle, int64_t node, std::vector<int64_t> shape) {
    meshmem_pool pool{handle};
    TORCH_CHECK(node >= 0 && node <= UINT32_MAX, "node ", node, " is not a node id");
    size_t bytes = float_bytes(shape);
    TORCH_CHECK(bytes > 0, "shape holds no element; allocate at least one");

    meshmem_placement placement{};
    placement.kind = MESHMEM_PLACE_NODE;
    placement.node = static_cast<uint32_t>(node);
    meshmem_advice advice{MESHMEM_ADVICE_NONE, 0};
    uint64_t addr = 0;
    check(meshmem_alloc(pool, bytes, 64, &placement, advice, &addr), "meshmem_alloc");

    void *ptr = nullptr;
    meshmem_status mapped = meshmem_local_ptr(pool, addr, bytes, &ptr);
    if (mapped != MESHMEM_OK) {
        meshmem_free(pool, addr);
        check(mapped, "meshmem_local_ptr");
    }
    // The deleter runs when the tensor's storage dies. If the pool left
    // before that, meshmem_free fails on the stale handle and the memory
    // stays allocated until the group ends; nothing is freed twice.
    auto deleter = [pool, addr](void *) { meshmem_free(pool, addr); };
    return torch::from_blob(ptr, shape, deleter, torch::TensorOptions().dtype(torch::kFloat32));
}

torch::Tensor view_at(uint64_t handle, uint64_t addr, std::vector<int64_t> shape) {
    meshmem_pool pool{handle};
    size_t bytes = float_bytes(shape);
    void *ptr = nullptr;
    check(meshmem_local_ptr(pool, addr, bytes, &ptr), "meshmem_local_ptr");
    return torch::from_blob(ptr, shape, torch::TensorOptions().dtype(torch::kFloat32));
}

int64_t home_of(uint64_t handle, uint64_t addr) {
    uint32_t node = 0;
    check(meshmem_home_of(meshmem_pool{handle}, addr, &node), "meshmem_home_of");
    return node;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("alloc_on", &alloc_on, "A float32 tensor in pool memory homed on `node`; freed with the tensor");
    m.def("view_at", &view_at, "A float32 tensor viewing pool memory at `addr`, without a copy");
    m.def("home_of", &home_of, "The home node of the page holding `addr`");
}
