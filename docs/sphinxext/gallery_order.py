"""The order of the examples on the gallery index: from first steps to scale."""

# Listed first, in this order; any other example follows, by file name.
ORDER = (
    "plot_quickstart_elpv.py",
    "plot_localization.py",
    "plot_compare_detectors.py",
    "plot_grid_search.py",
    "plot_parallel_dask.py",
    "plot_mvtec_ad.py",
)


class ExampleOrder:
    """sphinx-gallery ``within_subsection_order`` key (a class it instantiates
    with the gallery's source folder, named by its qualified name so that the
    configuration stays picklable)."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        rank = ORDER.index(filename) if filename in ORDER else len(ORDER)
        return rank, filename

    def __repr__(self):
        return f"{type(self).__name__}()"
