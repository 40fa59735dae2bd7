/*
 * sweep_mpi_stub.c: the MPI part of a sweep in a kvsim built without MPI (no mpicc found by the
 * Makefile, or MPICC= given): kv_sweep_run then refuses to run under a launcher with more than one
 * process, where each copy would run the whole sweep. sweep_mpi.c is the real one.
 */
#include "sim/common/kv_common.h"
#include "sim/sweep.h"
#include "sim/sweep_internal.h"

int kv_sweep_mpi_available(void)
{
    return 0;
}

int kv_sweep_mpi_run(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum)
{
    (void)s;
    (void)o;
    (void)sum;
    return kv_error(KV_EUNAVAIL, "this kvsim was built without MPI (mpicc was not found when it was built)");
}
