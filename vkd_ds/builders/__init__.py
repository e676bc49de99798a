"""The parts of a training job, each built by one builder that owns its branches and its start-up log
lines, in the order `vkd_ds.train.train` calls them:

- `inputs.prepare`: every input checked, no process group, nothing written (the objective from
  `objective.build_objective`);
- `start.plan_start`: the resume point, the layout, DeepSpeed's configs, the planned objective;
- `teacher.build_teacher`: the teacher cache, the live teacher engine, or none;
- `student.build_student_engine`: the student module in its engine;
- `sampling.build_sampling`: the sampler, the mercy gate and sequence KD;
- `trainer.build_trainer`: the trainer over them, restored when resuming.

Import the builders from their modules: the teacher's and the student's pull in DeepSpeed and
transformers, which the launcher's own checks (`inputs`) do not need.
"""
