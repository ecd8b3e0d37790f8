/*
 * abi_test.c: one node of a group, driving the C ABI of meshmem.
 *
 * Run on four nodes under the launcher (ffi/run-tests.sh does this):
 *   meshmem run --mesh 2x2x1 -- ./abi_test
 *
 * Each node checks the mesh queries, fills an allocation homed on its
 * neighbour, reads every other node's through meshmem_read and through the
 * local pointer, counts on node 0's word with remote atomics, joins a second
 * pool through an all-gather callback, and checks that every kind of bad
 * argument returns an error status with a message and changes nothing.
 * Exits 0 and prints "abi_test: node N passed" when every check held.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "meshmem.h"

static unsigned me = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "abi_test: node %u: %s:%d: check failed: %s\n", me, __FILE__, \
                    __LINE__, #cond);                                                    \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* The call succeeds; otherwise print the library's message and stop. */
#define OK(call)                                                                           \
    do {                                                                                   \
        meshmem_status status_ = (call);                                                   \
        if (status_ != MESHMEM_OK) {                                                       \
            fprintf(stderr, "abi_test: node %u: %s:%d: %s returned %s: %s\n", me, __FILE__, \
                    __LINE__, #call, meshmem_status_name(status_),                         \
                    meshmem_last_error_message());                                         \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* The call fails with `expected` and its message mentions `word`. */
#define FAILS(call, expected, word)                                                        \
    do {                                                                                   \
        meshmem_status status_ = (call);                                                   \
        const char *message_ = meshmem_last_error_message();                               \
        if (status_ != (expected) || strstr(message_, (word)) == NULL) {                   \
            fprintf(stderr,                                                                \
                    "abi_test: node %u: %s:%d: %s returned %s (%s), expected %s naming "   \
                    "`%s`\n",                                                              \
                    me, __FILE__, __LINE__, #call, meshmem_status_name(status_), message_, \
                    meshmem_status_name(expected), (word));                                \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static const meshmem_advice NO_ADVICE = {MESHMEM_ADVICE_NONE, 0};

/* Frames in use on this node; other nodes allocate only on themselves
 * while this is compared. */
static uint64_t frames_used(meshmem_pool pool, unsigned nodes) {
    meshmem_node_stats stats[16];
    size_t count = 0;
    OK(meshmem_stats(pool, stats, 16, &count));
    CHECK(count == nodes);
    return stats[me].frames_used;
}

/* The all-gather callback for the second join: the first pool's all-gather. */
static int32_t gather_through_pool(void *user, const void *send, size_t len, void *recv) {
    meshmem_pool *pool = user;
    uint32_t size = 0;
    if (meshmem_size(*pool, &size) != MESHMEM_OK) return -1;
    return meshmem_all_gather(*pool, send, len, recv, len * size) == MESHMEM_OK ? 0 : -2;
}

static void before_join(void) {
    meshmem_pool none = {0};
    uint32_t value = 7;
    FAILS(meshmem_size(none, &value), MESHMEM_ERR_INVALID_HANDLE, "meshmem_join");
    CHECK(value == 7);
    FAILS(meshmem_barrier(none), MESHMEM_ERR_INVALID_HANDLE, "null");
    meshmem_pool made_up = {0x00000005000000ffULL};
    FAILS(meshmem_quiet(made_up), MESHMEM_ERR_INVALID_HANDLE, "never issued");
    FAILS(meshmem_join_env(NULL), MESHMEM_ERR_INVALID_ARGUMENT, "`pool`");
    FAILS(meshmem_options_init(NULL), MESHMEM_ERR_INVALID_ARGUMENT, "`options`");
    CHECK(strcmp(meshmem_status_name(99), "unknown status") == 0);
}

static void bad_arguments(meshmem_pool pool, unsigned nodes, uint64_t page, uint64_t mine) {
    meshmem_buffer buffer = {0};
    OK(meshmem_buffer_alloc(pool, 64, 8, NULL, NO_ADVICE, &buffer));
    uint64_t before = frames_used(pool, nodes);
    uint64_t addr = 0xdead;
    char byte = 0;

    /* Null out-pointers and buffers. */
    FAILS(meshmem_node(pool, NULL), MESHMEM_ERR_INVALID_ARGUMENT, "`node`");
    FAILS(meshmem_alloc(pool, 64, 8, NULL, NO_ADVICE, NULL), MESHMEM_ERR_INVALID_ARGUMENT, "`addr`");
    FAILS(meshmem_read(pool, mine, NULL, 8), MESHMEM_ERR_INVALID_ARGUMENT, "`dst`");
    FAILS(meshmem_write(pool, mine, NULL, 8), MESHMEM_ERR_INVALID_ARGUMENT, "`src`");
    FAILS(meshmem_local_ptr(pool, mine, 8, NULL), MESHMEM_ERR_INVALID_ARGUMENT, "`ptr`");
    FAILS(meshmem_stats(pool, NULL, 4, &(size_t){0}), MESHMEM_ERR_INVALID_ARGUMENT, "`nodes`");

    /* Lengths that overflow. */
    FAILS(meshmem_read(pool, mine, &byte, SIZE_MAX), MESHMEM_ERR_INVALID_ARGUMENT, "`len`");
    FAILS(meshmem_write(pool, UINT64_MAX - 2, &byte, 8), MESHMEM_ERR_INVALID_ARGUMENT, "overflows");
    FAILS(meshmem_alloc(pool, SIZE_MAX - 4, 8, NULL, NO_ADVICE, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "`size`");
    FAILS(meshmem_alloc(pool, 64, 3, NULL, NO_ADVICE, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "`align`");
    FAILS(meshmem_alloc(pool, 0, 8, NULL, NO_ADVICE, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "`size` is 0");
    CHECK(addr == 0xdead);

    /* Unaligned 64-bit atomics. */
    uint64_t old = 42;
    FAILS(meshmem_fetch_add_u64(pool, mine + 3, 1, &old), MESHMEM_ERR_UNALIGNED, "aligned");
    FAILS(meshmem_compare_exchange_u64(pool, mine + 4, 0, 1, &old), MESHMEM_ERR_UNALIGNED, "aligned");
    CHECK(old == 42);

    /* Unknown placement and advice values, and nodes outside the mesh. */
    meshmem_placement placement = {0};
    placement.kind = 77;
    FAILS(meshmem_alloc(pool, 64, 8, &placement, NO_ADVICE, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "`placement.kind` 77");
    placement.kind = MESHMEM_PLACE_NODE;
    placement.node = nodes + 3;
    FAILS(meshmem_alloc(pool, 64, 8, &placement, NO_ADVICE, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "outside the mesh");
    placement.kind = MESHMEM_PLACE_INTERLEAVE;
    placement.nodes = NULL;
    placement.pages_per_stripe = 0;
    FAILS(meshmem_alloc(pool, 64, 8, &placement, NO_ADVICE, &addr), MESHMEM_ERR_CONFIG, "pages_per_stripe");
    meshmem_advice advice = {9, 0};
    FAILS(meshmem_alloc(pool, 64, 8, NULL, advice, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "`advice.kind` 9");
    advice.kind = MESHMEM_ADVICE_PREFERRED_LOCATION;
    advice.node = 1000;
    FAILS(meshmem_alloc(pool, 64, 8, NULL, advice, &addr), MESHMEM_ERR_INVALID_ARGUMENT, "node 1000");
    CHECK(addr == 0xdead);

    /* Addresses outside any allocation. */
    FAILS(meshmem_read(pool, 16, &byte, 1), MESHMEM_ERR_INVALID_ADDRESS, "window");
    FAILS(meshmem_free(pool, mine + 8), MESHMEM_ERR_INVALID_ADDRESS, "0x");

    /* A buffer used after free, and a double free. */
    uint64_t doomed = 0;
    OK(meshmem_alloc(pool, page, page, NULL, NO_ADVICE, &doomed));
    OK(meshmem_write(pool, doomed, "x", 1));
    OK(meshmem_free(pool, doomed));
    FAILS(meshmem_read(pool, doomed, &byte, 1), MESHMEM_ERR_INVALID_ADDRESS, "not allocated");
    FAILS(meshmem_free(pool, doomed), MESHMEM_ERR_INVALID_ADDRESS, "0x");

    /* Buffers: tensors must fit, and a released handle is stale. */
    int64_t shape[2] = {INT64_MAX / 2, 4};
    meshmem_tensor_desc desc = {2, shape, NULL, MESHMEM_DL_FLOAT, 32, 1, 0, 0, 0};
    void *managed = NULL;
    FAILS(meshmem_buffer_dlpack(buffer, &desc, &managed), MESHMEM_ERR_INVALID_ARGUMENT, "2^6");
    shape[0] = 4;
    shape[1] = 5;
    FAILS(meshmem_buffer_dlpack(buffer, &desc, &managed), MESHMEM_ERR_INVALID_ARGUMENT, "buffer of 64 bytes");
    desc.dtype_code = 3;
    FAILS(meshmem_buffer_dlpack(buffer, &desc, &managed), MESHMEM_ERR_INVALID_ARGUMENT, "`desc.dtype_code` 3");
    desc.dtype_code = MESHMEM_DL_FLOAT;
    desc.dtype_bits = 12;
    FAILS(meshmem_buffer_dlpack(buffer, &desc, &managed), MESHMEM_ERR_INVALID_ARGUMENT, "`desc.dtype_bits`");
    desc.dtype_bits = 32;
    shape[1] = 4;
    CHECK(managed == NULL);
    CHECK(frames_used(pool, nodes) == before);

    OK(meshmem_buffer_dlpack(buffer, &desc, &managed));
    CHECK(managed != NULL);
    OK(meshmem_buffer_release(buffer));
    FAILS(meshmem_buffer_release(buffer), MESHMEM_ERR_INVALID_HANDLE, "released");
    FAILS(meshmem_buffer_dlpack(buffer, &desc, &managed), MESHMEM_ERR_INVALID_HANDLE, "stale");
    /* The exported tensor still holds the memory; deleting it frees it. */
    OK(meshmem_dlpack_delete(managed, 0));
    FAILS(meshmem_dlpack_delete(NULL, 5), MESHMEM_ERR_INVALID_ARGUMENT, "`versioned` 5");
}

int main(void) {
    before_join();

    meshmem_pool pool = {0};
    OK(meshmem_join_env(&pool));
    uint32_t size = 0;
    uint64_t page = 0;
    OK(meshmem_node(pool, &me));
    OK(meshmem_size(pool, &size));
    OK(meshmem_page_size(pool, &page));
    CHECK(size == 4);

    /* Mesh queries on 2x2x1. */
    meshmem_mesh_shape shape;
    OK(meshmem_mesh(pool, &shape));
    CHECK(shape.x == 2 && shape.y == 2 && shape.z == 1 && shape.torus == 0);
    meshmem_coord coord;
    OK(meshmem_coord_of(pool, me, &coord));
    CHECK(coord.x == me % 2 && coord.y == me / 2 && coord.z == 0);
    uint32_t hops = 0;
    OK(meshmem_hops(pool, 0, 3, &hops));
    CHECK(hops == 2);
    FAILS(meshmem_hops(pool, 0, 4, &hops), MESHMEM_ERR_INVALID_ARGUMENT, "node 4");

    /* Fill two pages homed on the next node. */
    uint32_t next = (me + 1) % size;
    meshmem_placement on_next = {MESHMEM_PLACE_NODE, next, {0, 0, 0}, NULL, 0, 0};
    size_t words = 2 * page / 8;
    uint64_t mine = 0;
    OK(meshmem_alloc(pool, words * 8, 8, &on_next, NO_ADVICE, &mine));
    uint32_t home = 99;
    OK(meshmem_home_of(pool, mine, &home));
    CHECK(home == next);
    uint64_t *values = malloc(words * 8);
    for (size_t i = 0; i < words; i++) values[i] = (uint64_t)me << 32 | i;
    OK(meshmem_write(pool, mine, values, words * 8));

    /* Node 0's counter. */
    uint64_t counter = 0;
    if (me == 0) OK(meshmem_alloc(pool, 8, 8, NULL, NO_ADVICE, &counter));
    uint64_t sent[2] = {mine, counter};
    uint64_t all[4][2];
    OK(meshmem_quiet(pool));
    OK(meshmem_all_gather(pool, sent, sizeof sent, all, sizeof all));
    counter = all[0][1];
    for (int i = 0; i < 10; i++) OK(meshmem_fetch_add_u64(pool, counter, 1, &(uint64_t){0}));

    /* Read every node's pages through the API and through the pointer. */
    for (uint32_t owner = 0; owner < size; owner++) {
        uint64_t at = all[owner][0];
        OK(meshmem_read(pool, at, values, words * 8));
        for (size_t i = 0; i < words; i++) CHECK(values[i] == ((uint64_t)owner << 32 | i));
        void *ptr = NULL;
        OK(meshmem_local_ptr(pool, at, words * 8, &ptr));
        CHECK((uint64_t)(uintptr_t)ptr == at);
        CHECK(((uint64_t *)ptr)[words - 1] == ((uint64_t)owner << 32 | (words - 1)));
    }
    OK(meshmem_barrier(pool));

    uint64_t total = 0;
    OK(meshmem_read(pool, counter, &total, 8));
    CHECK(total == 10 * size);
    uint64_t previous = 0;
    OK(meshmem_barrier(pool));
    if (me == 0) {
        OK(meshmem_compare_exchange_u64(pool, counter, 1, 5, &previous));
        CHECK(previous == total); /* no swap */
        OK(meshmem_compare_exchange_u64(pool, counter, total, 5, &previous));
        CHECK(previous == total); /* swapped */
    }
    OK(meshmem_barrier(pool));
    OK(meshmem_read(pool, counter, &total, 8));
    CHECK(total == 5);

    bad_arguments(pool, size, page, mine);
    OK(meshmem_barrier(pool));

    /* A second pool, joined through an all-gather callback over the first. */
    meshmem_options options;
    OK(meshmem_options_init(&options));
    options.group = NULL;
    options.node_capacity = 16 * page;
    meshmem_pool second = {0};
    FAILS(meshmem_join_with_allgather(&options, NULL, NULL, &second), MESHMEM_ERR_INVALID_ARGUMENT, "`allgather`");
    OK(meshmem_join_with_allgather(&options, gather_through_pool, &pool, &second));
    uint32_t second_me = 99;
    OK(meshmem_node(second, &second_me));
    CHECK(second_me == me);
    uint64_t block = 0;
    OK(meshmem_alloc(second, 64, 8, NULL, NO_ADVICE, &block));
    OK(meshmem_barrier(second));
    OK(meshmem_free(second, block));
    OK(meshmem_barrier(second));
    OK(meshmem_leave(second));

    /* Everything returns to the pool. */
    OK(meshmem_free(pool, mine));
    if (me == 0) OK(meshmem_free(pool, counter));
    OK(meshmem_barrier(pool));
    meshmem_node_stats stats[4];
    size_t count = 0;
    FAILS(meshmem_stats(pool, stats, 2, &count), MESHMEM_ERR_BUFFER_TOO_SMALL, "4 nodes");
    CHECK(count == 4);
    OK(meshmem_stats(pool, stats, 4, &count));
    for (int i = 0; i < 4; i++) CHECK(stats[i].bytes_local + stats[i].bytes_remote > 0);
    OK(meshmem_barrier(pool));

    /* A handle used after leave is stale. */
    OK(meshmem_leave(pool));
    FAILS(meshmem_size(pool, &size), MESHMEM_ERR_INVALID_HANDLE, "left");
    FAILS(meshmem_leave(pool), MESHMEM_ERR_INVALID_HANDLE, "stale");
    free(values);
    printf("abi_test: node %u passed\n", me);
    return 0;
}
