//! `ssrl sft`: the SFT cold start's run (its settings, progress table, resume and curves are
//! the training commands' shared ones, in `train.rs`).

use super::*;

pub fn run_sft(a: RunArgs) -> Result<()> {
    use spatial_ssrl::train::sft::{Sft, SftConfig};
    let Some(cfg) = run_config::<SftConfig>(&a)? else {
        return Ok(());
    };
    let (world, resume) = start_run(&cfg.out, a.resume)?;
    let mut t = Sft::new(cfg.clone(), a.ort_lib.as_deref())?;
    [t.precision_note(), t.weights_note(), t.vision_note()]
        .into_iter()
        .flatten()
        .for_each(note);
    resume_from(world, resume, t.latest_checkpoint(), &cfg.out, |dir| {
        t.restore(dir)?;
        Ok(t.step())
    })?;
    let total = t.total_steps();
    note(format!(
        "SFT: {} examples, {} × {} per step{}, {} steps ({} per epoch), lr {} {}",
        t.examples(),
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        match world.size {
            1 => String::new(),
            n => format!(" × {n} ranks"),
        },
        total,
        t.steps_per_epoch(),
        cfg.learning_rate,
        cfg.lr_scheduler_type.name()
    ));
    let (stop, pb) = run_bar(total, t.step())?;
    say(
        &pb,
        format!(
            "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "step", "loss", "tok acc", "lr", "grad", "tok/s"
        ),
    );
    let end = t.run(stop, |m, step, left_out| {
        for e in left_out {
            say(&pb, format!("step {step}: example left out: {e}"));
        }
        let g = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        say(
            &pb,
            format!(
                "{step:>6} {:>9.4} {:>9.4} {:>9.2e} {:>9.3} {:>9.1}",
                g("sft/loss"),
                g("sft/token_accuracy"),
                g("sft/lr"),
                g("sft/grad_norm"),
                g("sft/tokens_per_s")
            ),
        );
        pb.set_position(step as u64);
        pb.set_message(format!("loss {:.3}", g("sft/loss")));
    })?;
    end_run("sft", &a, &cfg.out, pb, end, |c| {
        format!(
            "done: adapter in {} — merge it with `ssrl export --model {} --adapter {} --out DIR` \
             and start GRPO from that package",
            c.display(),
            cfg.model.display(),
            c.display()
        )
    })
}
