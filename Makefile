# kvsim: the only build file.
#   make            build build/kvsim (and the CUDA backend when nvcc exists)
#   make test       run every Check suite (CPU backend)
#   make demo       capture, replay and analyze on the default model into out/demo/
#   make closed-loop    kvsim eval + replay + niah on SmolLM2 into out/closed/ (closed-loop-stories: stories260K)
#   make test-gpu   CPU vs CUDA parity runner (prints why and runs nothing without a GPU)
#   make test-cuda-emu   the CUDA kernels' code run by a host emulator vs the CPU (no GPU needed)
#   make gpu-bundle statically linked gpu_parity, bench_gpu, kvsim for the GPU machines (bench/README.md)
#   make bench-capture | bench-replay | bench-replay-scaling | bench-gpu | bench-trace-flip   benchmarks (figures printed)
#   make lint       cppcheck and clang-format --dry-run
#   make fuzz       libFuzzer harnesses of tests/fuzz/ (clang, build-fuzz/), FUZZ_TIME seconds each
#   make fuzz-smoke every harness for 20 s (CI)
#   make test-asan  every Check suite built with AddressSanitizer + UBSan (build-asan/; CI)
# V=1 shows the commands; CUDA_ARCH=sm_80 picks another GPU architecture; NVCC= builds without CUDA,
# MPICC= without MPI (kvsim sweep under mpirun);
# CUDA_VERIFIED=1 lets --backend auto pick CUDA (only once make test-gpu has passed on a GPU).

.DEFAULT_GOAL := all
BUILD ?= build
Q := $(if $(V),,@)
NO_CONFIG_GOALS := clean help

# ---- configuration: Debian packages and compiler flags, resolved once into $(BUILD)/config.mk
PKGS := hdf5 libzstd cairo openblas libcrypto json-c libpcre2-8 icu-uc check
ifeq ($(filter $(NO_CONFIG_GOALS),$(MAKECMDGOALS)),)
include $(BUILD)/config.mk
endif
$(BUILD)/config.mk: scripts/install-deps.sh Makefile
	$(Q)scripts/install-deps.sh
	$(Q)mkdir -p $(BUILD)
	$(Q){ echo "PKG_CFLAGS := $$(pkg-config --cflags $(PKGS))"; \
	     echo "PKG_LIBS := $$(pkg-config --libs hdf5 libzstd cairo openblas libcrypto json-c libpcre2-8 icu-uc)"; \
	     echo "CHECK_LIBS := $$(pkg-config --libs check)"; \
	     nv=$$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; }); \
	     echo "NVCC_FOUND := $$nv"; \
	     mc=$$(command -v mpicc); echo "MPICC_FOUND := $$mc"; \
	     if [ -n "$$mc" ]; then \
	         echo "MPI_CFLAGS := $$(mpicc --showme:compile 2>/dev/null || pkg-config --cflags mpich 2>/dev/null)"; \
	         echo "MPI_LIBS := $$(mpicc --showme:link 2>/dev/null || pkg-config --libs mpich 2>/dev/null)"; fi; } > $@
	$(Q)echo "kvsim: configured ($(BUILD)/config.mk)"

NVCC ?= $(NVCC_FOUND)
CUDA_ARCH ?= sm_90
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
GIT_REV := $(shell git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)

CC ?= gcc
OPT ?= -O2
CFLAGS ?= $(OPT) -g
ALL_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-format-truncation -fopenmp -I. -I$(BUILD) $(PKG_CFLAGS) \
              $(CFLAGS) -MMD -MP
LIBS := $(PKG_LIBS) -lm -fopenmp
CUDA_VERIFIED ?= 0
$(BUILD)/obj/kernels/backend.o $(BUILD)/obj/tests/test_backend_select.o: ALL_CFLAGS += -DKV_CUDA_VERIFIED=$(CUDA_VERIFIED)

# ---- sources: every .c under the module folders goes into libkvsim.a
LIB_SRC := $(wildcard sim/common/*.c sim/*.c sim/policies/*.c kernels/*.c kernels/cpu/*.c \
             traces/*.c traces/capture/*.c analyze/*.c plots/*.c)
LIB_SRC := $(filter-out traces/zstd_plugin.c,$(LIB_SRC))
ifneq ($(NVCC),)
LIB_SRC := $(filter-out kernels/cuda_stub.c,$(LIB_SRC))
CU_SRC := $(wildcard kernels/cuda/*.cu)
LIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++ -ldl -lrt -lpthread
endif
# MPI (kvsim sweep under mpirun): sim/sweep_mpi.c when mpicc exists, its stub otherwise; MPICC= builds
# without MPI.
MPICC ?= $(MPICC_FOUND)
ifneq ($(MPICC),)
LIB_SRC := $(filter-out sim/sweep_mpi_stub.c,$(LIB_SRC))
LIBS += $(MPI_LIBS)
$(BUILD)/obj/sim/sweep_mpi.o: ALL_CFLAGS += $(MPI_CFLAGS)
else
LIB_SRC := $(filter-out sim/sweep_mpi.c,$(LIB_SRC))
endif
CLI_SRC := $(wildcard sim/cli/*.c)
TEST_SRC := $(wildcard tests/test_*.c) tests/kv_test.c tests/kv_test_check.c tests/kv_test_filter.c tests/check_main.c
BENCH_SRC := $(wildcard bench/*.c)

LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(CU_SRC:%.cu=$(BUILD)/obj/%.cu.o)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/obj/%.o)
LIBKV := $(BUILD)/libkvsim.a
KVSIM := $(BUILD)/kvsim
TESTS := $(BUILD)/kvsim_tests
PLUGIN := $(BUILD)/plugins/libkvsim_h5zstd.so

.PHONY: fuzz fuzz-build fuzz-smoke test-asan bench-trace-flip all test demo closed-loop closed-loop-stories test-gpu test-cuda-emu gpu-bundle gpu-bundle-files bench-capture bench-replay bench-replay-scaling bench-gpu lint clean help goldens
all: $(KVSIM) $(PLUGIN)

# The CPU kernels are compiled for the build machine's vector units (AVX2 where it has them);
# CPU_ARCH= builds portable code, CPU_ARCH=-march=x86-64-v3 a fixed target.
CPU_ARCH ?= -march=native
$(BUILD)/obj/kernels/cpu/%.o: ALL_CFLAGS += -O3 $(CPU_ARCH)

$(BUILD)/obj/%.o: %.c $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  CC    $<")
	$(Q)$(CC) $(ALL_CFLAGS) -c $< -o $@

# -lineinfo: source lines for compute-sanitizer and Nsight Compute reports (no effect on the code).
$(BUILD)/obj/%.cu.o: %.cu $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  NVCC  $<")
	$(Q)$(NVCC) -O2 -std=c++17 -arch=$(CUDA_ARCH) -lineinfo -I. $(filter -I%,$(PKG_CFLAGS)) \
	    -Xcompiler -fPIC,-Wall,-Wno-format-truncation -MMD -MP -c $< -o $@

# The git revision stamped into traces and results: rewritten when it changes, so only
# kv_common.c recompiles.
$(BUILD)/kv_gitrev.h: FORCE
	@mkdir -p $(BUILD)
	@echo '#define KV_GIT_REV "$(GIT_REV)"' > $@.tmp; cmp -s $@.tmp $@ || mv $@.tmp $@; rm -f $@.tmp
$(BUILD)/obj/sim/common/kv_common.o: $(BUILD)/kv_gitrev.h
.PHONY: FORCE
FORCE:

$(LIBKV): $(LIB_OBJ)
	@$(if $(V),,echo "  AR    $@")
	$(Q)rm -f $@ && ar rcs $@ $^

$(KVSIM): $(CLI_OBJ) $(LIBKV)
	@$(if $(V),,echo "  LD    $@")
	$(Q)$(CC) $(LDFLAGS) $(CLI_OBJ) $(LIBKV) $(LIBS) -o $@

# Check suites: every `Suite *suite_xxx(void)` in tests/test_*.c is collected into suites.h.
$(BUILD)/suites.h: $(wildcard tests/test_*.c)
	@mkdir -p $(dir $@)
	$(Q)grep -ho '^Suite \*suite_[a-z0-9_]*(void)' $^ | sed 's/^Suite \*\(suite_[a-z0-9_]*\)(void)/X(\1)/' | sort > $@.tmp
	$(Q)cmp -s $@.tmp $@ || mv $@.tmp $@; rm -f $@.tmp
$(BUILD)/obj/tests/check_main.o: $(BUILD)/suites.h
$(BUILD)/obj/tests/%.o: ALL_CFLAGS += -I$(BUILD)

$(TESTS): $(TEST_OBJ) $(LIBKV)
	@$(if $(V),,echo "  LD    $@")
	$(Q)$(CC) $(LDFLAGS) $(TEST_OBJ) $(LIBKV) $(LIBS) $(CHECK_LIBS) -o $@

$(PLUGIN): traces/zstd_plugin.c traces/kv_zstd_filter.c sim/common/kv_common.c $(BUILD)/config.mk $(BUILD)/kv_gitrev.h
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  SO    $@")
	$(Q)$(CC) -shared -fPIC $(ALL_CFLAGS) -MF $(BUILD)/plugin.d traces/zstd_plugin.c traces/kv_zstd_filter.c \
	    sim/common/kv_common.c $(PKG_LIBS) -o $@

test: $(TESTS) $(KVSIM) $(PLUGIN)
	$(Q)rm -rf $(BUILD)/test-tmp
	$(Q)KVSIM_BIN=$(abspath $(KVSIM)) KVSIM_PLUGIN_DIR=$(abspath $(dir $(PLUGIN))) $(TESTS)

demo: $(KVSIM)
	$(Q)$(KVSIM) demo -o out/demo

# The closed-loop study (README "Closed-loop evaluation"): one prompt replayed (open loop) and evaluated
# closed loop with every policy x 3 budgets, the NIAH grid, and the report with the open-vs-closed figure,
# into out/closed/smollm2/ (about 30 minutes on 2 cores) or out/closed/stories260K/ (about a minute).
closed-loop: $(KVSIM)
	$(Q)KVSIM=$(KVSIM) scripts/closed-loop.sh smollm2
closed-loop-stories: $(KVSIM)
	$(Q)KVSIM=$(KVSIM) scripts/closed-loop.sh stories260K

$(BUILD)/bench_%: bench/%.c $(LIBKV)
	@$(if $(V),,echo "  LD    $@")
	$(Q)$(CC) $(ALL_CFLAGS) $< $(LIBKV) $(LIBS) -o $@

bench-capture: $(BUILD)/bench_capture
	$(Q)$(BUILD)/bench_capture
bench-replay: $(BUILD)/bench_replay $(KVSIM)
	$(Q)$(BUILD)/bench_replay
# issue 11's scaling benchmark: traces at 2K, 8K (32 layers) and 32K (4 layers) tokens, ~5 GB in build/bench
bench-replay-scaling: $(BUILD)/bench_replay_scaling
	$(Q)$(BUILD)/bench_replay_scaling
bench-gpu: $(BUILD)/bench_gpu
	$(Q)$(BUILD)/bench_gpu
# every metadata byte of a small trace damaged in turn, the whole trace read each time (traces/FORMAT.md)
bench-trace-flip: $(BUILD)/bench_trace_flip $(KVSIM)
	$(Q)$(KVSIM) synth --preset tiny --layers 2 --tokens 64 --decode 8 -q -o $(BUILD)/flip.h5
	$(Q)$(BUILD)/bench_trace_flip $(BUILD)/flip.h5 $(FLIP_STEP)

$(BUILD)/gpu_parity: tests/gpu_parity.c $(LIBKV)
	@$(if $(V),,echo "  LD    $@")
	$(Q)$(CC) $(ALL_CFLAGS) $< $(LIBKV) $(LIBS) -o $@
test-gpu: $(BUILD)/gpu_parity
	$(Q)$(BUILD)/gpu_parity

# gpu-bundle: gpu_parity, bench_gpu and kvsim for the GPU machines, whose image lacks HDF5, cairo,
# OpenBLAS and Check: everything but the C library, the CUDA driver and cuBLAS (found in the image's
# CUDA 13) linked statically, stripped and gzip'ed (about 35 MB together, under the 64 MiB a device
# call carries), with run.sh to unpack and run them. bench/README.md has the commands. The objects are
# built apart ($(BUILD)/bundle-build) with the CPU kernels for x86-64-v3 (AVX2, FMA), not for this
# machine (-march=native could use instructions the GPU machine's processor lacks).
BUNDLE ?= $(BUILD)/gpu-bundle
BUNDLE_CPU_ARCH ?= -march=x86-64-v3
BUNDLE_BIN := $(BUILD)/gpu-bundle-bin
BUNDLE_LIBS = -Wl,--gc-sections -Wl,-Bstatic $(filter -L%,$(PKG_LIBS)) -lhdf5 -lsz -laec -lz -lzstd \
    $(filter-out -lm -lrt -ldl -pthread -lpthread,$(shell pkg-config --static --libs cairo)) \
    -lopenblas -lgfortran -lquadmath -lcrypto -ljson-c -lpcre2-8 -licuuc -licudata $(shell $(CC) -print-file-name=libgomp.a) \
    -lstdc++ -Wl,-Bdynamic \
    $(if $(NVCC),$(BUNDLE_CUDA)) -lm -ldl -lrt -lpthread -static-libgcc
BUNDLE_CUDA = -L$(CUDA_HOME)/lib64 -lcublas -lcudart_static -Wl,-rpath,/usr/local/cuda/lib64
$(BUNDLE_BIN)/gpu_parity: $(BUILD)/obj/tests/gpu_parity.o $(LIBKV)
$(BUNDLE_BIN)/bench_gpu: $(BUILD)/obj/bench/gpu.o $(LIBKV)
$(BUNDLE_BIN)/kvsim: $(CLI_OBJ) $(LIBKV)
$(BUNDLE_BIN)/%:
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  LD    $@ (static)")
	$(Q)$(CC) $^ $(BUNDLE_LIBS) -o $@ && strip $@
$(BUNDLE)/%.gz: $(BUNDLE_BIN)/%
	@mkdir -p $(dir $@)
	$(Q)gzip -9 -c $< > $@.tmp && mv $@.tmp $@
$(BUNDLE)/run.sh: scripts/gpu-bundle-run.sh
	@mkdir -p $(dir $@)
	$(Q)cp $< $@ && chmod +x $@
gpu-bundle:
	$(Q)$(MAKE) --no-print-directory BUILD=$(BUILD)/bundle-build BUNDLE=$(BUNDLE) CPU_ARCH="$(BUNDLE_CPU_ARCH)" MPICC= \
	    gpu-bundle-files
	$(Q)du -sh $(BUNDLE) | sed 's/^/kvsim: gpu-bundle: /'
	$(Q)test $$(du -sm $(BUNDLE) | cut -f1) -lt 60 || { echo "kvsim: gpu-bundle is over 60 MiB"; exit 1; }
	$(Q)$(BUNDLE)/run.sh gpu_parity --only none | head -n 3
gpu-bundle-files: $(BUNDLE)/gpu_parity.gz $(BUNDLE)/bench_gpu.gz $(BUNDLE)/kvsim.gz $(BUNDLE)/run.sh

# Host emulation of the CUDA kernels (tests/cuda_emu/): the kernel files compiled by g++ and run by a
# fiber emulator behind the parity runner, to check their logic on machines without a GPU.
EMU_CXXFLAGS := -x c++ -std=c++17 -O2 -g -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-variable -DKV_CUDA_EMULATE \
                -I. $(filter -I%,$(PKG_CFLAGS)) -include tests/cuda_emu/cuda_emu.h -MMD -MP
EMU_SRC := kernels/cuda/cuda_elementwise.cu kernels/cuda/cuda_attention.cu kernels/cuda/cuda_ragged.cu \
           tests/cuda_emu/emu_backend.cpp
EMU_OBJ := $(EMU_SRC:%=$(BUILD)/emu/%.o)
$(BUILD)/emu/%.o: % tests/cuda_emu/cuda_emu.h $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  EMU   $<")
	$(Q)$(CXX) $(EMU_CXXFLAGS) -c $< -o $@
$(BUILD)/gpu_parity_emu: tests/gpu_parity.c $(EMU_OBJ) $(LIBKV)
	@$(if $(V),,echo "  LD    $@")
	$(Q)$(CC) $(ALL_CFLAGS) -DKV_PARITY_EMU $< $(EMU_OBJ) $(LIBKV) $(LIBS) -lstdc++ -o $@
# The kernel ops run again under the two most skewed thread orders (tests/cuda_emu/README.md): a
# missing __syncthreads or __syncwarp changes their results there, not under the default round robin.
EMU_KERNEL_OPS := rmsnorm,rope,swiglu,add,add_bias,attention,attn_stats,attn_probs,attn_colstats,attn_ragged
test-cuda-emu: $(BUILD)/gpu_parity_emu
	$(Q)$(BUILD)/gpu_parity_emu --emulated
	$(Q)for s in lo hi; do KVEMU_SCHED=$$s $(BUILD)/gpu_parity_emu --emulated --only $(EMU_KERNEL_OPS) --max-work 1e7 \
	    >$(BUILD)/emu-sched-$$s.txt 2>&1 || { cat $(BUILD)/emu-sched-$$s.txt; echo "test-cuda-emu: FAIL (schedule $$s)"; \
	    exit 1; }; grep -E '^gpu_parity: ([0-9]+ cases|PASS)' $(BUILD)/emu-sched-$$s.txt | sed "s/^/schedule $$s: /"; done

# Fuzzing (not part of make test): the library built by clang with AddressSanitizer and coverage in
# build-fuzz/, one binary per tests/fuzz/fuzz_*.c, seeds from tests/fuzz/make_seeds.c, corpora kept in
# build-fuzz/corpus/; FUZZ_TIME seconds per harness.
FUZZ_TIME ?= 120
FUZZ_ALL := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
# trace_file (raw .h5 bytes) is left out by default: it mostly finds crashes inside libhdf5 1.10
# (out-of-bounds reads in object-header parsing of hostile files), which kvsim cannot fix. Run it
# with make fuzz FUZZ_NAMES=trace_file.
FUZZ_NAMES ?= $(filter-out trace_file,$(FUZZ_ALL))
FUZZ_LINK := tests/kv_test.c tests/test_capture_fixtures.c
# (clang 14 rejects __builtin_cpu_supports("f16c"): kv_f16.c and kernels/cpu/weights.c are compiled by gcc,
# uninstrumented.)
fuzz:
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz CC=gcc NVCC= MPICC= CFLAGS="-O1 -g" build-fuzz/obj/traces/kv_f16.o \
	    build-fuzz/obj/kernels/cpu/weights.o
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz CC=clang NVCC= MPICC= \
	    CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address -Wno-unknown-warning-option" fuzz-build
	$(Q)for h in $(FUZZ_NAMES); do mkdir -p build-fuzz/corpus/$$h build-fuzz/artifacts; \
	    ASAN_OPTIONS=allocator_may_return_null=1:suppressions=tests/fuzz/asan.supp LSAN_OPTIONS=suppressions=tests/fuzz/lsan.supp build-fuzz/fuzz/fuzz_$$h -max_len=65536 -max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
	        -artifact_prefix=build-fuzz/artifacts/$$h- build-fuzz/corpus/$$h build-fuzz/seeds/$$h || exit 1; done
fuzz-build: $(FUZZ_ALL:%=$(BUILD)/fuzz/fuzz_%) $(BUILD)/fuzz/make_seeds
	$(Q)$(BUILD)/fuzz/make_seeds $(BUILD)/seeds
$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_LINK) $(LIBKV)
	@mkdir -p $(dir $@)
	@$(if $(V),,echo "  FUZZ  $@")
	$(Q)$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer $< $(FUZZ_LINK) $(LIBKV) $(LIBS) -o $@
$(BUILD)/fuzz/make_seeds: tests/fuzz/make_seeds.c $(FUZZ_LINK) $(LIBKV)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(ALL_CFLAGS) $< $(FUZZ_LINK) $(LIBKV) $(LIBS) -o $@

# fuzz-smoke (CI): every harness, trace_file included, for 20 s each from the seeds (about 4 min of
# fuzzing after a 4-minute clang build on 2 cores).
fuzz-smoke:
	$(Q)$(MAKE) --no-print-directory fuzz FUZZ_TIME=20 FUZZ_NAMES="$(FUZZ_ALL)"

# test-asan (CI): the library, the CLI and every Check suite built by gcc with AddressSanitizer and
# UndefinedBehaviorSanitizer (any undefined behaviour stops the run) in build-asan/, run as make test
# runs them, with Check's timeouts multiplied by 4 (the instrumented SmolLM2 demo takes minutes).
# tests/asan/lsan.supp holds the LeakSanitizer suppressions (fontconfig's cache, which cairo's text
# rendering fills and never frees), tests/asan/asan.supp the ASan rule for libhdf5's own copies on
# damaged files; the h5py interop tests load the uninstrumented zstd plugin of the normal build.
# Built without MPI (OpenMPI's own allocations would fill the leak report; make test runs the MPI
# sweep).
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
test-asan: $(PLUGIN)
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan NVCC= MPICC= CFLAGS="-O1 -g $(SAN_FLAGS)" LDFLAGS="$(SAN_FLAGS)" \
	    build-asan/kvsim build-asan/kvsim_tests
	$(Q)rm -rf build/test-tmp
	$(Q)CK_TIMEOUT_MULTIPLIER=4 \
	    ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:suppressions=$(abspath tests/asan/asan.supp) \
	    LSAN_OPTIONS=suppressions=$(abspath tests/asan/lsan.supp):print_suppressions=0 \
	    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$(abspath tests/asan/ubsan.supp) \
	    KVSIM_BIN=$(abspath build-asan/kvsim) KVSIM_PLUGIN_DIR=$(abspath $(dir $(PLUGIN))) build-asan/kvsim_tests

lint:
	cppcheck --quiet --enable=warning,performance,portability --std=c11 -I. --suppress=missingIncludeSystem \
	    --inline-suppr sim kernels traces analyze plots tests
	clang-format --dry-run --Werror $(LIB_SRC) $(CLI_SRC) $(TEST_SRC)

clean:
	rm -rf $(BUILD)

help:
	@sed -n '2,17p' Makefile | sed 's/^# //'

-include $(shell find $(BUILD)/obj $(BUILD)/emu -name '*.d' 2>/dev/null)
