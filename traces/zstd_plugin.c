/* zstd_plugin.c: entry points that make kv_zstd_filter.c loadable as an HDF5 dynamic plugin
 * (build/plugins/libkvsim_h5zstd.so) for tools that read traces outside kvsim. */
#include <H5PLextern.h>

extern const H5Z_class2_t kv_zstd_filter_class;

H5PL_type_t H5PLget_plugin_type(void)
{
    return H5PL_TYPE_FILTER;
}
const void *H5PLget_plugin_info(void)
{
    return &kv_zstd_filter_class;
}
