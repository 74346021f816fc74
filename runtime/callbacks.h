/* callbacks.h (internal) — train.on_save: a user command run after each checkpoint, in the
 * background, whose PNG outputs become TensorBoard images. */
#ifndef STRATA_RUNTIME_CALLBACKS_H
#define STRATA_RUNTIME_CALLBACKS_H

#include "metrics.h"

typedef struct st_on_save_jobs st_on_save_jobs;

st_on_save_jobs *st_on_save_create(const char *command, st_logger *log, st_tfevents *tb);
/* Starts `sh -c command` with STRATA_CHECKPOINT=<checkpoint_dir>, STRATA_STEP=<step> and
 * STRATA_SAMPLES_DIR=<samples_dir> (created) in its environment; output goes to
 * <samples_dir>/on_save.log. Returns at once; a command that cannot start is logged, not fatal. */
void st_on_save_start(st_on_save_jobs *j, const char *checkpoint_dir, const char *samples_dir, int64_t step);
/* Reaps finished commands: logs their exit status (with the tail of the log when they failed) and
 * adds every *.png they wrote to TensorBoard as an image at their step. `wait`: block until all are
 * done (end of training). */
void st_on_save_poll(st_on_save_jobs *j, bool wait);
void st_on_save_free(st_on_save_jobs *j); /* waits for running commands */

#endif /* STRATA_RUNTIME_CALLBACKS_H */
